"""The engine on a CUDA device: KV sizing from --mem_fraction, exact greedy tokens, seeds.

Skipped where there is no GPU (CI); run on the GPU machine with `python -m pytest tests/gpu`.
"""

from __future__ import annotations

import pytest
import torch

from ocula import LLM, SamplingParams
from tests.engine.conftest import PROMPTS, reference_continuations

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("piecewise_tokens", [512, 0])
def test_kv_pool_is_sized_from_mem_fraction(tiny_checkpoint, piecewise_tokens) -> None:
    torch.cuda.empty_cache()
    llm = LLM(
        str(tiny_checkpoint("llama")),
        mem_fraction=0.3,
        device="cuda",
        piecewise_graph_max_tokens=piecewise_tokens,
    )
    core = llm.engine.core
    pool = core.runner.kv_pool
    free, total = torch.cuda.mem_get_info()
    used = total - free
    assert pool.k_caches[0].is_cuda
    assert core.allocator.capacity > 100_000  # a 2-layer toy model: millions of tokens fit
    # Inside the budget but for what memory_budget does not reserve: the driver's share of the
    # language model's graphs and of kernels first loaded after sizing (~0.2 GiB on an H100).
    assert used <= 0.3 * total + (256 << 20)
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True))
    assert len(out[0].token_ids) == 8
    del llm, core, pool
    torch.cuda.empty_cache()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "internlm2"])
def test_greedy_tokens_equal_transformers_on_cuda(tiny_checkpoint, arch) -> None:
    checkpoint = tiny_checkpoint(arch)
    expected = reference_continuations(checkpoint, PROMPTS, 10)
    llm = LLM(str(checkpoint), device="cuda", data_type="fp32", max_total_token_num=4096)
    params = SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True)
    assert [o.token_ids for o in llm.generate(list(PROMPTS), params)] == expected


def test_prompt_logprobs_on_cuda_equal_the_cpu_engine(tiny_checkpoint) -> None:
    # Chunks of 4 tokens run through the piecewise graphs; the LM head over their rows too.
    checkpoint = str(tiny_checkpoint("qwen2"))
    params = SamplingParams(temperature=0, max_new_tokens=2, prompt_logprobs=2)
    options = {"data_type": "fp32", "max_total_token_num": 4096, "chunked_prefill_size": 4}
    cuda = LLM(checkpoint, device="cuda", **options).generate(list(PROMPTS), params)
    cpu = LLM(checkpoint, device="cpu", **options).generate(list(PROMPTS), params)
    for on_cuda, on_cpu in zip(cuda, cpu, strict=True):
        assert len(on_cuda.prompt_logprobs) == len(on_cpu.prompt_logprobs)
        for a, b in zip(on_cuda.prompt_logprobs[1:], on_cpu.prompt_logprobs[1:], strict=True):
            assert a.token_id == b.token_id
            assert a.logprob == pytest.approx(b.logprob, abs=2e-3)
            assert [v for _, v in a.top_logprobs] == pytest.approx(
                [v for _, v in b.top_logprobs], abs=2e-3
            )


def test_seeded_sampling_is_reproducible_on_cuda(tiny_checkpoint) -> None:
    llm = LLM(str(tiny_checkpoint("llama")), device="cuda", max_total_token_num=4096)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=3, max_new_tokens=12, ignore_eos=True)
    alone = llm.generate(PROMPTS[1], params)[0].token_ids
    crowd = llm.generate(list(PROMPTS), [SamplingParams(max_new_tokens=12)] + [params] * 3)
    assert crowd[1].token_ids == alone


def test_pixel_normalization_on_cuda_is_bit_identical_to_the_cpu() -> None:
    from ocula.multimodal.image_processing import normalize_pixels

    generator = torch.Generator().manual_seed(0)
    tiles = torch.randint(0, 256, (3, 3, 448, 448), generator=generator, dtype=torch.uint8)
    on_cpu = normalize_pixels(tiles)
    on_cuda = normalize_pixels(tiles.cuda())
    assert on_cuda.is_cuda and torch.equal(on_cuda.cpu(), on_cpu)


def test_image_embedding_pool_is_part_of_mem_fraction(tmp_path, monkeypatch) -> None:
    from tests.helpers.images import random_png
    from tests.helpers.tiny_internvl import make_hf_internvl

    monkeypatch.setenv("INTERNVL_IMAGE_LENGTH", "4")
    checkpoint = make_hf_internvl(tmp_path / "internvl", "qwen2")
    prompt = {"prompt": "<image>\ndescribe it", "images": [random_png(200, 90, 2)]}
    params = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
    gib = 1 << 30
    kv_tokens, pool_bytes, outputs = [], [], []
    for cache_gb in (2.0, 0.01):
        torch.cuda.empty_cache()
        # Capacity for a million images: --image_cache_gb bounds the pool.
        llm = LLM(
            str(checkpoint),
            mem_fraction=0.3,
            device="cuda",
            cache_capacity=1_000_000,
            image_cache_gb=cache_gb,
        )
        core = llm.engine.core
        pool = core.runner.embedding_pool
        page = pool.nbytes // pool.num_pages
        assert pool.pages.is_cuda and cache_gb * gib - page < pool.nbytes <= cache_gb * gib
        free, total = torch.cuda.mem_get_info()
        assert total - free <= 0.3 * total + (256 << 20)  # the vision graphs are inside it
        outputs.append(llm.generate(prompt, params)[0].token_ids)
        kv_tokens.append(core.allocator.capacity)
        pool_bytes.append(pool.nbytes)
        bytes_per_token = core.runner.kv_pool.bytes_per_token(
            *core.runner.model.kv_cache_shape(), pool.pages.dtype
        )
        del llm, core, pool
    assert outputs[0] == outputs[1]
    # The larger pool came out of the KV cache.
    freed = (kv_tokens[1] - kv_tokens[0]) * bytes_per_token
    assert freed >= 0.9 * (pool_bytes[0] - pool_bytes[1])
    torch.cuda.empty_cache()
