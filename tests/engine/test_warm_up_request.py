"""The server's warm-up request: it runs an image through the whole engine, then leaves the engine
as start-up left it (caches empty, counters at zero), so that requests after it get the same
tokens and the same statistics as on an engine that never ran it. The front's warm-up decodes and
expands an image prompt, then forgets the image."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest
from PIL import Image

from ocula import LLM, SamplingParams
from ocula.engine.warm_up_request import (
    WARM_UP_REQUEST_ID,
    noise_image,
    synthetic_image_span,
    warm_up_engine,
)
from ocula.multimodal import loaded_images
from ocula.multimodal.preprocess_span import preprocess_span
from ocula.sampling.params import SamplingParams as Params
from ocula.server.images import FrontImages
from tests.helpers.images import random_png
from tests.helpers.tiny_internvl import make_hf_internvl

GREEDY = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def tiny_tile_length():
    # The tiny checkpoints make 4 tokens per 56 px tile; INTERNVL_IMAGE_LENGTH must agree.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INTERNVL_IMAGE_LENGTH", "4")
        yield


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_hf_internvl(tmp_path_factory.mktemp("internvl-hf"), "qwen2")


PROMPTS = [
    {"prompt": "what is <image> here?", "images": [random_png(120, 60, 1)]},
    {"prompt": "and <image> now?", "images": [random_png(120, 60, 1)]},  # the same image: a hit
    "plain text after the images",
]


def count_encoded_images(core) -> list[int]:
    """Images per call of the vision encoder, from now on."""
    encoder = core.runner.image_encoder
    calls: list[int] = []
    real_encode = encoder.encode
    encoder.encode = lambda inputs: (calls.append(len(inputs)), real_encode(inputs))[1]
    return calls


def test_the_synthetic_image_is_two_resized_tiles_and_a_thumbnail(checkpoint) -> None:
    llm = LLM(str(checkpoint), device="cpu")
    config = llm.engine.model_config
    span = synthetic_image_span(config, offset=3)
    tiles = preprocess_span(span)
    side = config.image_size
    assert tiles.shape == (3, 3, side, side)
    assert span.length == 3 * config.tokens_per_tile
    assert Image.open(io.BytesIO(span.image_bytes)).size == (side * 7 // 4, side)


def test_requests_after_the_warm_up_see_a_fresh_engine(checkpoint) -> None:
    fresh = LLM(str(checkpoint), device="cpu")
    warmed = LLM(str(checkpoint), device="cpu")
    core = warmed.engine.core
    started = core.stats()
    encoded = count_encoded_images(core)
    warm_up_engine(core, warmed.engine.model_config, with_image=True)

    assert encoded == [1]  # the image went through the vision encoder
    assert core.take_vit_batch_sizes() == []  # which the ViT batch-size metric does not count
    assert core.stats() == started  # caches empty, counters at zero, all KV free
    assert not core.has_work()
    assert WARM_UP_REQUEST_ID not in core.scheduler.requests

    expected = [out.outputs[0].token_ids for out in fresh.generate(PROMPTS, GREEDY)]
    got = [out.outputs[0].token_ids for out in warmed.generate(PROMPTS, GREEDY)]
    assert got == expected
    assert core.stats() == fresh.engine.core.stats()
    assert core.stats().image_cache_misses == 1 and core.stats().image_cache_hits == 1
    # The runner dropped the warm-up's embedding with the first plan after it.
    assert set(core.runner.image_pages) == set(fresh.engine.core.runner.image_pages)


def test_a_text_only_warm_up_runs_no_vision_encoder(checkpoint) -> None:
    llm = LLM(str(checkpoint), device="cpu")
    core = llm.engine.core
    started = core.stats()
    encoded = count_encoded_images(core)
    warm_up_engine(core, llm.engine.model_config, with_image=False)
    assert encoded == []
    assert core.stats() == started


@pytest.mark.parametrize(
    ("kv_tokens", "image_tokens"),
    [(64, 12), (24, 4), (20, None), (12, "nothing")],
    ids=["three-tiles", "one-tile", "text", "nothing-fits"],
)
def test_a_smaller_warm_up_runs_where_the_limits_refuse_the_first(
    checkpoint, kv_tokens, image_tokens
) -> None:
    """16 text tokens, 4 per tile, 2 new tokens: 30, 22 and 18 tokens of KV."""
    llm = LLM(str(checkpoint), device="cpu", max_total_token_num=kv_tokens)
    core = llm.engine.core
    started = core.stats()
    ran = []
    encoded = count_encoded_images(core)
    real_add = core.add_request
    core.add_request = lambda request: (real_add(request), ran.append(request))[0]
    seconds = warm_up_engine(core, llm.engine.model_config, with_image=True)
    if image_tokens == "nothing":
        assert seconds is None and ran == []
    else:
        [request] = ran
        assert sum(span.length for span in request.images) == (image_tokens or 0)
        assert encoded == ([1] if image_tokens else [])
    assert core.stats() == started


def test_the_warm_up_needs_an_idle_engine(checkpoint) -> None:
    llm = LLM(str(checkpoint), device="cpu")
    llm.engine.add_request("busy", "some text", Params(temperature=0, max_new_tokens=2))
    with pytest.raises(RuntimeError, match="idle engine"):
        warm_up_engine(llm.engine.core, llm.engine.model_config, with_image=True)


def test_the_front_decodes_and_expands_an_image_then_forgets_it(checkpoint, monkeypatch) -> None:
    llm = LLM(str(checkpoint), device="cpu")
    images = FrontImages(llm.engine.vision, llm.engine.tokenizer, allow_local_media=False)
    decoded = []
    real_decode = loaded_images.decode_image
    monkeypatch.setattr(
        loaded_images, "decode_image", lambda *args: decoded.append(1) or real_decode(*args)
    )
    asyncio.run(images.warm_up())
    assert decoded == [1]  # through the decoding thread, as a client's new image
    assert len(images.known_sizes) == 0  # the first client image is decoded like any new one


def test_a_failed_front_warm_up_only_logs(checkpoint, monkeypatch, caplog) -> None:
    llm = LLM(str(checkpoint), device="cpu")
    images = FrontImages(llm.engine.vision, llm.engine.tokenizer, allow_local_media=False)

    async def broken(*args: object) -> None:
        raise OSError("no decoder today")

    monkeypatch.setattr(images, "tokenize", broken)
    asyncio.run(images.warm_up())
    assert "image warm-up failed: no decoder today" in caplog.text


def test_the_noise_image_is_a_png_where_jpeg_cannot_be_written(monkeypatch) -> None:
    real_save = Image.Image.save

    def save(self, fp, format=None, **params):
        if format == "JPEG":
            raise OSError("encoder jpeg not available")
        return real_save(self, fp, format=format, **params)

    monkeypatch.setattr(Image.Image, "save", save)
    picture = Image.open(io.BytesIO(noise_image(70, 40)))
    assert (picture.format, picture.size) == ("PNG", (70, 40))
