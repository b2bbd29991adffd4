"""LightLLM's `skip_image_cache` and vLLM's `mm_processor_kwargs` on a live InternVL server (a
tiny random checkpoint): an image sent with the first is encoded afresh and shares no cache entry;
the second caps an OpenAI request's tiles per image."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import httpx
import pytest

from tests.helpers.images import random_png
from tests.helpers.server import RunningServer, start_server
from tests.helpers.tiny_internvl import make_hf_internvl
from tests.server.test_multimodal_server import TILE_TOKENS, metric


@pytest.fixture(scope="module")
def vlm_server(tmp_path_factory) -> Iterator[RunningServer]:
    checkpoint = make_hf_internvl(tmp_path_factory.mktemp("internvl"), "qwen2")
    flags = ("--enable_multimodal", "--max_total_token_num", "4096")
    running = start_server(checkpoint, tmp_path_factory.mktemp("logs"), *flags, env=TILE_TOKENS)
    yield running
    assert running.stop() == 0, running.log()


def ask(server: RunningServer, image: bytes, skip_image_cache: bool = False) -> dict:
    body = {
        "inputs": "Look: <img></img>What is it?",
        "parameters": {"max_new_tokens": 4, "do_sample": False, "return_details": True},
        "multimodal_params": {
            "images": [{"type": "base64", "data": base64.b64encode(image).decode()}],
            "skip_image_cache": skip_image_cache,
        },
    }
    response = httpx.post(server.url + "/generate", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_skip_image_cache_encodes_the_image_afresh(vlm_server) -> None:
    image = random_png(80, 80, 5)
    first = ask(vlm_server, image)
    encodes = metric(vlm_server, "ocula_vit_batch_size_count")
    hits = metric(vlm_server, "ocula_image_cache_hits_total")
    again = ask(vlm_server, image)  # the same request: served by the prefix cache
    assert again["tokens"][0]["prompt_cache_len"] > 0
    assert metric(vlm_server, "ocula_vit_batch_size_count") == encodes
    fresh = ask(vlm_server, image, skip_image_cache=True)
    assert metric(vlm_server, "ocula_vit_batch_size_count") == encodes + 1
    assert metric(vlm_server, "ocula_image_cache_hits_total") == hits
    # The text before the image still comes from the prefix cache, the image's tokens do not.
    prompt_cache_len = fresh["tokens"][0]["prompt_cache_len"]
    assert 0 < prompt_cache_len < again["tokens"][0]["prompt_cache_len"]
    assert fresh["generated_text"] == first["generated_text"]
    ask(vlm_server, image, skip_image_cache=True)  # no entry of the last one is shared either
    assert metric(vlm_server, "ocula_vit_batch_size_count") == encodes + 2


def test_mm_processor_kwargs_cap_the_tiles_of_a_chat_image(vlm_server) -> None:
    wide = base64.b64encode(random_png(300, 100, 9)).decode()
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{wide}"}},
                {"type": "text", "text": "What is it?"},
            ],
        }
    ]

    def prompt_tokens(**extra) -> int:
        body = {"messages": messages, "max_tokens": 1, **extra}
        response = httpx.post(vlm_server.url + "/v1/chat/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        return response.json()["usage"]["prompt_tokens"]

    tokens_per_tile = 4  # INTERNVL_IMAGE_LENGTH: placeholder tokens per tile
    default = prompt_tokens()
    capped = prompt_tokens(mm_processor_kwargs={"max_dynamic_patch": 1})
    # 300 x 100 in 56 px tiles takes the checkpoint's 12 (6 x 2) and a thumbnail by default, one
    # tile (no thumbnail) capped at 1.
    assert default - capped == 12 * tokens_per_tile
