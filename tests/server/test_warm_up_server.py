"""A vision server runs its warm-up request before it reports ready and forgets it: the first
client image is the image cache's first miss and only entry, and the prefix cache holds only
what clients sent."""

from __future__ import annotations

import base64
import re

import httpx

from tests.helpers.images import random_png
from tests.helpers.server import start_server
from tests.helpers.tiny_internvl import make_hf_internvl

TILE_TOKENS = {"INTERNVL_IMAGE_LENGTH": "4"}  # the tiny checkpoint's 56 px tiles


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    return {m[1]: float(m[2]) for m in re.finditer(r"^(ocula_\w+) (\S+)$", text, re.M)}


def test_the_first_request_finds_no_trace_of_the_warm_up(tmp_path) -> None:
    checkpoint = make_hf_internvl(tmp_path / "internvl", "qwen2")
    server = start_server(
        checkpoint, tmp_path, "--enable_multimodal", "--cache_capacity", "4", env=TILE_TOKENS
    )
    try:
        assert re.search(
            r"warm-up request \(\d+ prompt tokens, 12 image tokens\) took", server.log()
        )
        image = {"type": "base64", "data": base64.b64encode(random_png(120, 60, 7)).decode()}
        body = {
            "inputs": "look: <img></img> what is it?",
            "parameters": {"max_new_tokens": 3, "ignore_eos": True},
            "multimodal_params": {"images": [image]},
        }
        response = httpx.post(server.url + "/generate", json=body, timeout=60)
        assert response.status_code == 200, response.text
        seen = metrics(server.url)
        assert seen["ocula_image_cache_misses_total"] == 1
        assert seen["ocula_image_cache_hits_total"] == 0
        assert seen["ocula_image_cache_entries"] == 1
        assert seen["ocula_cached_prompt_tokens_total"] == 0
        assert seen["ocula_vit_batch_size_count"] == 1
        # The prefix cache holds this request's tokens and nothing of the warm-up's.
        prompt_tokens = response.json()["prompt_tokens"]
        assert prompt_tokens <= seen["ocula_prefix_cache_tokens"] <= prompt_tokens + 3
    finally:
        assert server.stop() == 0, server.log()


def test_skip_server_warmup_starts_without_it(tiny_checkpoint, tmp_path) -> None:
    server = start_server(tiny_checkpoint("llama"), tmp_path, "--skip_server_warmup")
    try:
        assert "warm-up request" not in server.log()
        response = httpx.post(
            server.url + "/generate",
            json={"inputs": "hello", "parameters": {"max_new_tokens": 2}},
            timeout=60,
        )
        assert response.status_code == 200, response.text
    finally:
        assert server.stop() == 0, server.log()
