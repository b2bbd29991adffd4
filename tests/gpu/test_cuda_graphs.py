"""The GPU fast path end to end: Triton attention and fused kernels, decode in CUDA graphs.

Greedy tokens must equal transformers' (fp32) and the same engine without graphs, for batch sizes
that fill a graph bucket exactly and ones that leave padding rows; the reference backend must
agree with the Triton one. Skipped without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from ocula import LLM, SamplingParams
from tests.engine.conftest import PROMPTS, reference_continuations
from tests.helpers.compiles import recorded_compiles

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

NEW_TOKENS = 12
GREEDY = SamplingParams(temperature=0, max_new_tokens=NEW_TOKENS, ignore_eos=True)


def generate(checkpoint, prompts, **engine_options) -> list[list[int]]:
    llm = LLM(
        str(checkpoint), device="cuda", data_type="fp32", max_total_token_num=8192, **engine_options
    )
    runner = llm.engine.core.runner
    if engine_options.get("disable_cudagraph") or engine_options.get("attention_backend"):
        assert runner.decode_graphs is None
    else:
        assert runner.decode_graphs is not None
    return [output.token_ids for output in llm.generate(list(prompts), GREEDY)]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "internlm2", "mistral"])
def test_graph_decode_equals_transformers(tiny_checkpoint, arch) -> None:
    checkpoint = tiny_checkpoint(arch)
    expected = reference_continuations(checkpoint, PROMPTS, NEW_TOKENS)
    assert generate(checkpoint, PROMPTS, graph_max_batch_size=8) == expected


@pytest.mark.parametrize("arch", ["qwen2", "internlm2"])
def test_batch_one_decode_through_the_gemv_equals_transformers(
    tiny_checkpoint, arch, monkeypatch
) -> None:
    """One prompt at a time, so every decode step has one row: the batch-1 decode graph is
    captured with every projection and the LM head on the GEMV kernels, the gate/up projection
    on one with SiLU-and-mul fused in, the norms folded in where the layer allows it (their
    weight shapes are recorded), and its greedy tokens equal transformers'."""
    import ocula.kernels.gemv as gemv_module
    import ocula.kernels.gemv_residual as gemv_residual_module
    import ocula.kernels.gemv_silu as gemv_silu_module
    from ocula.layers.embedding import ParallelLMHead
    from ocula.layers.linear import ColumnParallelLinear, RowParallelLinear
    from ocula.models.decoder_blocks import GatedMLP

    shapes: dict[str, set] = {}

    def record(module, name):
        original = getattr(module, name)
        shapes[name] = set()

        def recorded(x, *args, **kwargs):
            weight = args[1] if name.startswith("normed") else args[0]
            shapes[name].add(tuple(weight.shape))
            return original(x, *args, **kwargs)

        monkeypatch.setattr(module, name, recorded)

    record(gemv_module, "gemv")
    record(gemv_silu_module, "gemv_silu_and_mul")
    for name in ("gemv_add_residual", "normed_gemv", "normed_gemv_silu_and_mul"):
        record(gemv_residual_module, name)
    checkpoint = tiny_checkpoint(arch)
    llm = LLM(
        str(checkpoint),
        device="cuda",
        data_type="fp32",
        max_total_token_num=8192,
        graph_max_batch_size=8,
    )
    model = llm.engine.core.runner.model
    projections = (ColumnParallelLinear, RowParallelLinear, ParallelLMHead)
    every_weight = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, projections)}
    gate_up = {
        tuple(m.gate_up_proj.weight.shape) for m in model.modules() if isinstance(m, GatedMLP)
    }
    assert gate_up and gate_up == shapes["gemv_silu_and_mul"] | shapes["normed_gemv_silu_and_mul"]
    plain = shapes["gemv"] | shapes["normed_gemv"] | shapes["gemv_add_residual"]
    assert every_weight - gate_up <= plain
    assert shapes["normed_gemv"] and shapes["gemv_add_residual"]  # the layers fold their norms
    for prompt in PROMPTS[:2]:
        expected = reference_continuations(checkpoint, [prompt], NEW_TOKENS)
        assert [out.token_ids for out in llm.generate([prompt], GREEDY)] == expected


@pytest.mark.parametrize("count", [1, 3, 4, 9])
def test_graphs_equal_eager_and_reference_backend(tiny_checkpoint, count) -> None:
    checkpoint = tiny_checkpoint("qwen2")
    prompts = [PROMPTS[i % len(PROMPTS)] + " x" * i for i in range(count)]
    with_graphs = generate(checkpoint, prompts, graph_max_batch_size=8)  # 9: eager past 8
    assert with_graphs == generate(checkpoint, prompts, disable_cudagraph=True)
    assert with_graphs == generate(checkpoint, prompts, attention_backend="reference")


def test_vision_graphs_equal_eager_encoding(tmp_path, monkeypatch) -> None:
    from ocula.engine.image_encoder import VISION_GRAPH_MAX_TILES
    from ocula.engine.vision_graphs import VisionGraphs
    from tests.helpers.tiny_internvl import make_hf_internvl

    monkeypatch.setenv("INTERNVL_IMAGE_LENGTH", "4")
    checkpoint = make_hf_internvl(tmp_path / "internvl", "qwen2")
    llm = LLM(str(checkpoint), device="cuda", data_type="fp32", max_total_token_num=4096)
    encoder = llm.engine.core.runner.image_encoder
    graphs = encoder.encode_images
    assert isinstance(graphs, VisionGraphs)
    # Every tile count was captured at start-up; a larger batch runs eagerly.
    assert sorted(graphs._graphs) == list(range(1, VISION_GRAPH_MAX_TILES + 1))
    model = llm.engine.core.runner.model
    size = model.config.image_size
    generator = torch.Generator(device="cuda").manual_seed(0)
    earlier = []
    for tiles in (1, 3, VISION_GRAPH_MAX_TILES, 1, 3, VISION_GRAPH_MAX_TILES + 1):
        pixels = torch.randn(tiles, 3, size, size, device="cuda", generator=generator)
        with torch.inference_mode():
            expected = model.encode_images(pixels)
            encoded = graphs(pixels)
        assert torch.equal(encoded, expected)
        earlier.append((encoded, expected.clone()))
    # Results are fresh tensors: later replays, which share one static output, left them alone.
    assert all(torch.equal(encoded, expected) for encoded, expected in earlier)
    assert len(graphs._graphs) == VISION_GRAPH_MAX_TILES


def test_eager_vision_encoder_compiles_at_start_up(tmp_path, monkeypatch) -> None:
    """With --disable_cudagraph the encoder runs eagerly; its kernels are compiled at start-up,
    so the first image compiles nothing."""
    from tests.helpers.tiny_internvl import make_hf_internvl

    monkeypatch.setenv("INTERNVL_IMAGE_LENGTH", "4")
    checkpoint = make_hf_internvl(tmp_path / "internvl", "qwen2")
    llm = LLM(
        str(checkpoint),
        device="cuda",
        data_type="fp32",
        max_total_token_num=4096,
        disable_cudagraph=True,
    )
    runner = llm.engine.core.runner
    assert runner.image_encoder.encode_images == runner.model.encode_images  # no graphs
    size = runner.model.config.image_size
    with recorded_compiles() as compiled, torch.inference_mode():
        runner.image_encoder.encode_images(torch.randn(1, 3, size, size, device="cuda"))
    assert compiled == []


def test_bf16_vision_encoder_with_the_gelu_table_is_bit_identical(tmp_path, monkeypatch) -> None:
    """In bf16 on CUDA the ViT's GELU runs through the lookup table (`table_activation`): the
    embeddings, eager and through the captured graphs, equal those of F.gelu's path bit for bit."""
    import ocula.kernels.table_activation as table_activation
    import ocula.models.intern_vit as intern_vit
    from tests.helpers.tiny_internvl import make_hf_internvl

    monkeypatch.setenv("INTERNVL_IMAGE_LENGTH", "4")
    # Tiny tensors take the table too, from the graphs' capture on.
    monkeypatch.setattr(table_activation, "MIN_TABLE_ELEMENTS", 0)
    checkpoint = make_hf_internvl(tmp_path / "internvl", "qwen2")
    llm = LLM(str(checkpoint), device="cuda", data_type="bf16", max_total_token_num=4096)
    model = llm.engine.core.runner.model
    graphs = llm.engine.core.runner.image_encoder.encode_images
    lookups = []
    monkeypatch.setattr(
        table_activation,
        "_table_lookup_kernel",
        _CountingLauncher(table_activation._table_lookup_kernel, lookups),
    )
    size = model.config.image_size
    pixels = torch.randn(3, 3, size, size, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        replayed = graphs(pixels)  # captured at start-up, with the table
        with_table = model.encode_images(pixels)
        assert lookups  # the eager forward took the table path
        monkeypatch.setattr(intern_vit, "USE_TABLE_ACTIVATIONS", False)
        lookups.clear()
        with_gelu = model.encode_images(pixels)
        assert not lookups
    assert torch.equal(with_table, with_gelu)
    assert torch.equal(replayed, with_gelu)


class _CountingLauncher:
    """A Triton kernel's launcher that records each launch (`kernel[grid](...)`)."""

    def __init__(self, kernel, launches: list) -> None:
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        self.launches.append(grid)
        return self.kernel[grid]
