"""InternVL over HTTP: LightLLM's documented client, OpenAI image parts, the embedding cache and
batched ViT, on a live server with a tiny random InternVL checkpoint."""

from __future__ import annotations

import base64
import http.server
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from ocula import LLM, SamplingParams
from tests.helpers.images import random_png
from tests.helpers.server import RunningServer, free_port, start_server
from tests.helpers.tiny_internvl import make_hf_internvl

TILE_TOKENS = {"INTERNVL_IMAGE_LENGTH": "4"}  # the tiny checkpoint's 56 px tiles
QUERY = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<img></img>\n<img></img>\nWhat is this?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
LIGHTLLM_STOPS = [" <|endoftext|>", " <|im_start|>", " <|im_end|>"]


URL_IMAGE = random_png(150, 70, 1)
BASE64_IMAGE = random_png(60, 60, 2)


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/loop":  # redirects to itself: more redirects than the fetch allows
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.end_headers()
            return
        if self.path != "/demo.png":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(URL_IMAGE)))
        self.end_headers()
        self.wfile.write(URL_IMAGE)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def image_site() -> Iterator[str]:
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{site.server_address[1]}"
    site.shutdown()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_hf_internvl(tmp_path_factory.mktemp("internvl"), "qwen2")


@pytest.fixture(scope="module")
def vlm_server(checkpoint, tmp_path_factory) -> Iterator[RunningServer]:
    running = start_server(
        checkpoint,
        tmp_path_factory.mktemp("vlm-logs"),
        "--enable_multimodal",
        "--allow_local_media",
        "--visual_infer_batch_size",
        "4",
        "--cache_capacity",
        "16",
        "--max_total_token_num",
        "8192",
        # Flags of LightLLM launch scripts that Ocula accepts as they are.
        "--use_dynamic_prompt_cache",
        "--enable_fa3",
        "--disable_log_stats",
        "--graph_max_len_in_batch",
        "4096",
        "--dp",
        "1",
        env=TILE_TOKENS,
    )
    yield running
    assert running.stop() == 0, running.log()


@pytest.fixture(scope="module")
def offline(checkpoint) -> Iterator[LLM]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INTERNVL_IMAGE_LENGTH", "4")
        yield LLM(str(checkpoint), max_total_token_num=8192)


def metric(server: RunningServer, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match[1]) if match else 0.0


def test_lightllm_documented_client_gets_the_offline_answer(vlm_server, offline, image_site):
    data = {
        "inputs": QUERY,
        "parameters": {"max_new_tokens": 200, "stop_sequences": LIGHTLLM_STOPS},
        "multimodal_params": {
            "images": [
                {"type": "url", "data": image_site + "/demo.png"},
                {"type": "base64", "data": base64.b64encode(BASE64_IMAGE).decode()},
            ]
        },
    }
    response = httpx.post(vlm_server.url + "/generate", json=data, timeout=120)
    assert response.status_code == 200, response.text
    tokenizer = offline.tokenizer
    stop_ids = [tokenizer.encode(s)[1:][0] for s in LIGHTLLM_STOPS]
    expected = offline.generate(
        {"prompt": QUERY, "images": [URL_IMAGE, BASE64_IMAGE]},
        SamplingParams(temperature=0, max_new_tokens=200, stop_token_ids=stop_ids),
    )[0]
    body = response.json()
    assert body["generated_text"] == [expected.text]
    assert body["count_output_tokens"] == len(expected.token_ids)
    assert body["prompt_tokens"] == expected.prompt_tokens


def test_a_repeated_image_skips_the_vit(vlm_server) -> None:
    client = openai.OpenAI(base_url=vlm_server.url + "/v1", api_key="none")
    uri = "data:image/png;base64," + base64.b64encode(random_png(120, 120, 3)).decode()

    def ask(question: str):
        return client.chat.completions.create(
            model=client.models.list().data[0].id,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": question},
                        {"type": "image_url", "image_url": {"url": uri}},
                    ],
                }
            ],
            max_tokens=4,
            temperature=0,
        )

    misses = metric(vlm_server, "ocula_image_cache_misses_total")
    hits = metric(vlm_server, "ocula_image_cache_hits_total")
    encodes = metric(vlm_server, "ocula_vit_batch_size_count")
    # 16384 tokens (--max_req_total_len) of 4-token tiles: more than 16 images of 13 tiles.
    assert metric(vlm_server, "ocula_image_cache_tiles") == 4096
    ask("first question")
    assert metric(vlm_server, "ocula_image_cache_misses_total") == misses + 1
    assert 0 <= metric(vlm_server, "ocula_image_cache_tiles_free") < 4096  # its tiles stay cached
    assert metric(vlm_server, "ocula_vit_batch_size_count") == encodes + 1
    again = ask("another question")  # different text before the image: an embedding-cache hit
    assert metric(vlm_server, "ocula_image_cache_hits_total") == hits + 1
    assert metric(vlm_server, "ocula_vit_batch_size_count") == encodes + 1
    repeat = ask("another question")  # the same conversation: prefix-cache hit, image included
    assert repeat.usage.prompt_tokens_details.cached_tokens == repeat.usage.prompt_tokens - 1
    assert repeat.choices[0].message.content == again.choices[0].message.content
    assert metric(vlm_server, "ocula_vit_batch_size_count") == encodes + 1


def test_an_evicted_image_sent_again_is_encoded_from_the_copy_the_engine_kept(
    vlm_server, offline
) -> None:
    """The second time, the front leaves the image's bytes out of the request (the engine process
    holds them since the first); its embedding is gone by then, so the engine encodes it again
    from its own copy."""
    image = random_png(90, 90, 7)

    def ask(lead: str, picture: bytes) -> str:
        body = {
            "inputs": f"{lead}<img></img>What is it?",
            "parameters": {"max_new_tokens": 8, "do_sample": False},
            "multimodal_params": {
                "images": [{"type": "base64", "data": base64.b64encode(picture).decode()}]
            },
        }
        response = httpx.post(vlm_server.url + "/generate", json=body, timeout=120)
        assert response.status_code == 200, response.text
        return response.json()["generated_text"][0]

    ask("First look. ", image)
    for seed in range(100, 117):  # 17 other images: more than --cache_capacity 16 embeddings
        ask("Filler. ", random_png(60, 60, seed))
    misses = metric(vlm_server, "ocula_image_cache_misses_total")
    answer = ask("Second look. ", image)
    assert metric(vlm_server, "ocula_image_cache_misses_total") == misses + 1
    expected = offline.generate(
        {"prompt": "Second look. <img></img>What is it?", "images": [image]},
        SamplingParams(temperature=0, max_new_tokens=8),
    )[0]
    assert answer == expected.text


def test_concurrent_requests_share_vit_batches(vlm_server) -> None:
    before = metric(vlm_server, "ocula_vit_batch_size_count")
    singles = metric(vlm_server, 'ocula_vit_batch_size_bucket{le="1.0"}')

    def send(seed: int) -> int:
        image = base64.b64encode(random_png(56, 56, 100 + seed)).decode()
        body = {
            "inputs": f"image {seed}: <img></img>",
            "parameters": {"max_new_tokens": 2},
            "multimodal_params": {"images": [{"type": "base64", "data": image}]},
        }
        return httpx.post(vlm_server.url + "/generate", json=body, timeout=120).status_code

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(send, range(8))) == [200] * 8
    forwards = metric(vlm_server, "ocula_vit_batch_size_count") - before
    single_forwards = metric(vlm_server, 'ocula_vit_batch_size_bucket{le="1.0"}') - singles
    assert forwards < 8 and single_forwards < forwards  # some forwards took several images


def test_tiles_per_image_follow_lightllm_by_the_number_of_images(vlm_server) -> None:
    """Unset (or 0 or less), a request's tile cap is LightLLM's: the checkpoint's for one image,
    6 each for 2-6 images, one tile each beyond. A 4:3 picture of 4 x 3 tiles of 56 px: 12 tiles
    and a thumbnail under a cap of 12, 3 x 2 and a thumbnail under 6, a single tile under 1."""
    picture = {"type": "base64", "data": base64.b64encode(random_png(224, 168, 5)).decode()}

    def count(num_images: int, **parameters) -> int:
        body = {
            "text": "<img></img>" * num_images,
            "parameters": parameters,
            "multimodal_params": {"images": [picture] * num_images},
        }
        response = httpx.post(vlm_server.url + "/tokens", json=body, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()["ntokens"]

    text = count(0)
    assert count(1) == count(1, image_max_patch_num=-1) == text + 13 * 4 + 2  # + <img></img>
    assert count(2) == count(2, image_max_patch_num=6) == text + 2 * (7 * 4 + 2)
    assert count(2, image_max_patch_num=12) == text + 2 * (13 * 4 + 2)
    assert count(7) == count(7, image_max_patch_num=1) == text + 7 * (4 + 2)


@pytest.mark.parametrize(
    ("inputs", "images", "status", "message"),
    [
        ("<img></img><img></img>", [{"type": "base64", "data": "aGk="}], 400, "2 image tag"),
        ("<img></img>", [{"type": "base64", "data": "!!!"}], 400, "image 0"),
        ("no tags", [{"type": "base64", "data": "aGk="}], 400, "0 image tag"),
        (
            "<img></img>",
            [{"type": "base64", "data": base64.b64encode(b"text").decode()}],
            400,
            "image 0",
        ),
        ("<img></img>", [{"type": "url", "data": "http://127.0.0.1:9/none.png"}], 422, "image 0"),
    ],
)
def test_bad_images_get_clear_errors(vlm_server, image_site, inputs, images, status, message):
    body = {"inputs": inputs, "multimodal_params": {"images": images}}
    response = httpx.post(vlm_server.url + "/generate", json=body, timeout=60)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]
    for path, reason in (("/missing.png", "404"), ("/loop", "more than 3 redirects")):
        url = {"type": "url", "data": image_site + path}
        body = {"inputs": "<img></img>", "multimodal_params": {"images": [url]}}
        response = httpx.post(vlm_server.url + "/generate", json=body, timeout=60)
        assert response.status_code == 422, response.text
        assert reason in response.json()["error"]["message"], response.text


def test_image_length_must_match_the_checkpoint(checkpoint) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ocula.server.api_server",
            "--model_dir",
            str(checkpoint),
            "--enable_multimodal",
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "INTERNVL_IMAGE_LENGTH": "256"},
    )
    assert result.returncode != 0
    assert "INTERNVL_IMAGE_LENGTH is 256" in result.stdout + result.stderr
