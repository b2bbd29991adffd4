"""InternVL through the whole engine: greedy tokens equal transformers' with images in the
prompt, in both checkpoint layouts; the embedding cache and the prefix cache skip the ViT."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ocula import LLM, SamplingParams
from ocula.engine import embedding_pool
from ocula.multimodal.image_processing import normalize_pixels
from ocula.multimodal.preprocess_span import preprocess_span
from tests.helpers.images import random_png
from tests.helpers.tiny_internvl import load_hf_reference, make_hf_internvl, write_original_layout

GREEDY = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def tiny_tile_length(monkeypatch_module):
    # The tiny checkpoints make 4 tokens per 56 px tile; INTERNVL_IMAGE_LENGTH must agree.
    monkeypatch_module.setenv("INTERNVL_IMAGE_LENGTH", "4")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory) -> Path:
    return make_hf_internvl(tmp_path_factory.mktemp("internvl-hf"), "qwen2")


def reference_tokens(llm: LLM, checkpoint: Path, prompt: dict, max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation, fed the same ids and the reference tiling's pixels."""
    token_ids, spans = llm.engine.tokenize(prompt)
    pixels = normalize_pixels(torch.cat([preprocess_span(span) for span in spans]))
    model = load_hf_reference(checkpoint)
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([token_ids]),
            attention_mask=torch.ones(1, len(token_ids), dtype=torch.long),
            pixel_values=pixels,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
        )
    return out[0, len(token_ids) :].tolist()


PROMPTS = {
    "one-tile": {"prompt": "what is <image> here?", "images": [random_png(40, 40, 1)]},
    "many-tiles": {"prompt": "<image>\ndescribe it", "images": [random_png(200, 90, 2)]},
    "two-images": {
        "prompt": "compare <img></img> and <image> please",
        "images": [random_png(120, 60, 3), random_png(50, 170, 4)],
    },
}


@pytest.mark.parametrize("layout", ["hf-qwen2", "original-internlm2", "original-qwen2"])
def test_greedy_tokens_equal_transformers(hf_checkpoint, tmp_path_factory, layout) -> None:
    reference_dir = hf_checkpoint
    checkpoint = hf_checkpoint
    if layout.startswith("original"):
        text_arch = layout.split("-")[1]
        reference_dir = make_hf_internvl(
            tmp_path_factory.mktemp("hf"), "llama" if text_arch == "internlm2" else text_arch
        )
        checkpoint = write_original_layout(
            reference_dir, tmp_path_factory.mktemp("orig"), text_arch
        )
    llm = LLM(str(checkpoint), max_total_token_num=4096, chunked_prefill_size=7)
    for name, prompt in PROMPTS.items():
        expected = reference_tokens(llm, reference_dir, prompt, GREEDY.max_new_tokens)
        assert llm.generate(prompt, GREEDY)[0].token_ids == expected, name
    many = llm.engine.tokenize(PROMPTS["many-tiles"])[1][0]
    assert many.length > 4  # several tiles, so the 7-token chunks cut through the image


def test_second_turn_reuses_kv_and_embeddings_without_the_vit(hf_checkpoint) -> None:
    llm = LLM(str(hf_checkpoint), max_total_token_num=4096, cache_capacity=2)
    core = llm.engine.core
    image = random_png(120, 60, 7)
    first = {"prompt": "<image>\nwhat is it?", "images": [image]}
    out = llm.generate(first, GREEDY)[0]
    assert core.stats().image_cache_misses == 1
    assert core.runner.take_vit_batch_sizes() == [1]
    # Turn two repeats the conversation: the image's KV comes from the prefix cache.
    answer = llm.tokenizer.decode(out.token_ids)
    second = {"prompt": f"<image>\nwhat is it?{answer} and now?", "images": [image]}
    out2 = llm.generate(second, GREEDY)[0]
    assert out2.num_cached_tokens >= len(out.token_ids)
    assert core.runner.take_vit_batch_sizes() == []
    assert core.stats().images_in_prefix_cache == 1
    # The same image after different text: its embedding comes from the embedding cache.
    third = {"prompt": "tell me: <image>", "images": [image]}
    llm.generate(third, GREEDY)
    stats = core.stats()
    assert (stats.image_cache_hits, stats.image_cache_misses) == (1, 1)
    assert core.runner.take_vit_batch_sizes() == []


def test_full_cache_evicts_least_recently_used_only(hf_checkpoint) -> None:
    llm = LLM(str(hf_checkpoint), max_total_token_num=4096, cache_capacity=2)
    images = [random_png(40, 40, 10 + i) for i in range(3)]
    # Different text before each image, so that the prefix cache never covers the image.
    for step, image in enumerate((images[0], images[1], images[0], images[2])):
        llm.generate({"prompt": f"step {step}: <image>", "images": [image]}, GREEDY)
    index = llm.engine.core.images.index
    assert len(index) == 2 and index.num_in_use == 0
    assert set(llm.engine.core.runner.image_pages) == set(index._entries)
    llm.generate({"prompt": "x <image>", "images": [images[0]]}, GREEDY)
    assert index.hits == 2  # images[0] was refreshed, so images[2] evicted images[1]
    assert index.misses == 3


def test_requests_wait_for_room_in_a_small_embedding_pool(hf_checkpoint) -> None:
    # Six images of 9 tiles (4 tokens each) at once; the pool has 16 pages (max(1 image x 13
    # tiles, 64 tokens / 4)), so one embedding fits at a time and the rest wait for pages.
    prompts = [
        {"prompt": f"image {i}: <image>", "images": [random_png(200, 90, 40 + i)]} for i in range(6)
    ]
    roomy = LLM(str(hf_checkpoint), max_total_token_num=4096)
    expected = [out.token_ids for out in roomy.generate(prompts, GREEDY)]
    tight = LLM(
        str(hf_checkpoint), max_total_token_num=4096, cache_capacity=1, max_req_total_len=64
    )
    core = tight.engine.core
    assert core.runner.embedding_pool.num_pages == 16
    assert [s.length for s in tight.engine.tokenize(prompts[0])[1]] == [36]
    assert [out.token_ids for out in tight.generate(prompts, GREEDY)] == expected
    index = core.images.index
    assert index.num_in_use == 0 and index.misses == 6
    assert index.num_free_pages + sum(len(index.pages_of(k)) for k in index._entries) == 16
    stats = core.stats()
    assert (stats.image_cache_tiles, stats.image_cache_tiles_free) == (16, index.num_free_pages)


def test_a_request_whose_images_never_fit_the_pool_is_refused(hf_checkpoint, monkeypatch) -> None:
    # The pool always holds one request of --max_req_total_len tokens; should it ever hold less,
    # a request it cannot hold is refused on arrival instead of blocking the queue for good.
    monkeypatch.setattr(embedding_pool, "embedding_pool_pages", lambda *args: 4)
    llm = LLM(str(hf_checkpoint), max_total_token_num=4096)
    big = {"prompt": "<image>", "images": [random_png(200, 90, 50)]}  # 9 tiles
    with pytest.raises(ValueError, match="take 9 tiles of embeddings but the image-embedding"):
        llm.generate(big, GREEDY)
    small = {"prompt": "<image>", "images": [random_png(40, 40, 51)]}
    assert len(llm.generate(small, GREEDY)[0].token_ids) == GREEDY.max_new_tokens
    assert llm.engine.core.images.index.num_in_use == 0


def test_images_batch_together_and_requests_are_checked(hf_checkpoint) -> None:
    llm = LLM(str(hf_checkpoint), max_total_token_num=4096, visual_infer_batch_size=4)
    prompts = [
        {"prompt": f"{i}: <image>", "images": [random_png(60, 60, 20 + i)]} for i in range(6)
    ]
    llm.generate(prompts, GREEDY)
    assert llm.engine.core.runner.take_vit_batch_sizes() == [4, 2]
    with pytest.raises(ValueError, match="1 image tag"):
        llm.generate({"prompt": "<image>", "images": []}, GREEDY)
    with pytest.raises(ValueError, match="image 0"):
        llm.generate({"prompt": "<image>", "images": [b"not an image"]}, GREEDY)
    image = random_png(60, 60, 1)
    for cap in (-1, 65, 10**9, 2.0):  # the candidate grids grow with the cube of the cap
        with pytest.raises(ValueError, match="image_max_patch_num must be an int in"):
            llm.generate({"prompt": "<image>", "images": [image], "image_max_patch_num": cap})
    llm.generate({"prompt": "<image>", "images": [image], "image_max_patch_num": 64}, GREEDY)


def test_a_batch_decodes_its_images_in_threads_and_is_queued_all_or_none(
    hf_checkpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from ocula.multimodal.loaded_images import LoadedImage

    llm = LLM(str(hf_checkpoint), max_total_token_num=4096, max_req_total_len=64)
    engine = llm.engine
    decoded_in: list[str] = []
    real_decode = LoadedImage.decoded.__func__

    def recording_decode(cls, data, limits):
        decoded_in.append(threading.current_thread().name)
        return real_decode(cls, data, limits)

    monkeypatch.setattr(LoadedImage, "decoded", classmethod(recording_decode))
    good = [{"prompt": f"{i}: <image>", "images": [random_png(60, 60, 40 + i)]} for i in range(3)]
    bad_image = {"prompt": "<image>", "images": [b"not an image"]}
    with pytest.raises(ValueError, match="prompt 2: image 0"):
        engine.add_requests([(f"r{i}", p, GREEDY) for i, p in enumerate([*good[:2], bad_image])])
    assert not engine.has_unfinished_requests()
    assert decoded_in and all(name.startswith("ocula-image-decode") for name in decoded_in)
    # The core refuses the last prompt (longer than max_req_total_len): the others leave too.
    too_long = {"prompt": "word " * 80 + "<image>", "images": [random_png(60, 60, 50)]}
    with pytest.raises(ValueError, match=r"prompt 3: .*over the limit of 64 tokens"):
        engine.add_requests([(f"s{i}", p, GREEDY) for i, p in enumerate([*good, too_long])])
    assert not engine.has_unfinished_requests() and not engine.core.has_work()
    outputs = llm.generate(good, GREEDY)
    assert [len(out.outputs[0].token_ids) for out in outputs] == [8, 8, 8]


def test_a_core_never_steps_into_tiling_and_an_idle_one_waits_for_it(
    hf_checkpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A text request that arrives while an idle engine's only image is being tiled runs at
    once; the image request runs once its tiles are made, with the same tokens as alone."""
    import threading

    from ocula.multimodal import preprocess_span as preprocess_module

    gate = threading.Event()

    def gated(span):
        gate.wait(30)
        return preprocess_span(span)

    monkeypatch.setattr(preprocess_module, "preprocess_span", gated)
    llm = LLM(str(hf_checkpoint), max_total_token_num=4096)
    engine, core = llm.engine, llm.engine.core
    image_prompt = {"prompt": "look: <image>", "images": [random_png(80, 60, 70)]}
    engine.add_request("image", image_prompt, GREEDY)
    assert core.step(wait_for_tiles=False) == [] and core.waiting_for_tiles
    engine.add_request("text", "no image here", GREEDY)
    finished = []
    while not finished:  # the text request alone: its steps never wait for the tiling
        finished += engine.step()
    assert [out.request_id for out in finished] == ["text"] and not gate.is_set()
    for _ in range(3):  # the text request's last step in flight is applied
        if core.waiting_for_tiles:
            break
        assert core.step(wait_for_tiles=False) == []
    assert core.waiting_for_tiles and core.has_work()
    threading.Timer(0.05, gate.set).start()
    assert engine.step() == [] and gate.is_set()  # an idle in-process step waits for tiles
    while engine.has_unfinished_requests():
        finished += engine.step()
    assert (
        finished[1].outputs[0].token_ids
        == llm.generate(image_prompt, GREEDY)[0].outputs[0].token_ids
    )
