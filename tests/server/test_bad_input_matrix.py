"""The bad-input matrix on a live InternVL server, while a well-formed stream runs beside it:
each bad request gets its 4xx and a message naming the problem, unusual but valid images decode,
and the concurrent stream completes exactly. (Decoding and URL fetching are covered case by case
in tests/multimodal; this checks that the server maps them end to end.) Extreme values that are
valid (a top_k past int64) are served."""

from __future__ import annotations

import base64
import json
import threading

import httpx
import numpy as np
from PIL import Image

from tests.helpers.image_loading import encode, gradient
from tests.helpers.server import start_server
from tests.helpers.tiny_internvl import make_hf_internvl
from tests.multimodal.test_image_loading import sixteen_bit_rgb_png, with_declared_jpeg_size
from tests.server.load_tools import assert_caches_idle, sse_payloads, wait_until_idle

STREAM_TOKENS = 120  # outlasts the matrix, which takes well under a second
PNG = encode(gradient(64, 48), "PNG")


def b64(data: bytes) -> dict:
    return {"type": "base64", "data": base64.b64encode(data).decode()}


def with_images(tags: int, images: list[dict], **parameters) -> dict:
    return {
        "inputs": "look: " + "<img></img>" * tags,
        "parameters": {"max_new_tokens": 2, **parameters},
        "multimodal_params": {"images": images},
    }


def animated_gif() -> bytes:
    frames = [gradient(32, 32), Image.new("RGB", (32, 32), "red")]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], loop=0)


GOOD_IMAGES = {
    "animated GIF": animated_gif(),
    "16-bit PNG": sixteen_bit_rgb_png(np.full((20, 30, 3), 40000, dtype=np.uint16)),
    "CMYK JPEG": encode(gradient(40, 40).convert("CMYK"), "JPEG"),
    "palette PNG": encode(gradient(40, 40).convert("P"), "PNG"),
}
# (route, body, status, fragment of the message)
BAD_REQUESTS: list[tuple[str, bytes | dict, int, str]] = [
    ("/generate", b'{"inputs": "fox",', 400, "not valid JSON"),
    ("/generate", {"inputs": 5}, 400, "inputs"),
    ("/generate", {"parameters": {"max_new_tokens": 2}}, 400, "inputs"),
    ("/generate", {"inputs": "fox", "parameters": {"max_tokens": 2}}, 400, "max_tokens"),
    ("/generate", {"inputs": "fox", "parameters": {"temperature": -1}}, 400, "temperature"),
    ("/generate", {"inputs": "fox", "parameters": {"top_p": 1.5}}, 400, "top_p"),
    ("/generate", {"inputs": "fox", "parameters": {"max_new_tokens": 0}}, 400, "max_new_tokens"),
    ("/generate", {"inputs": "fox", "parameters": {"min_new_tokens": -1}}, 400, "min_new_tokens"),
    ("/generate", {"inputs": "fox " * 2000}, 400, "over the limit"),
    # Huge texts are refused after a chunk or two, not tokenized whole (280,000 characters).
    ("/generate", {"inputs": "fox " * 70_000}, 400, "characters alone hold"),
    (
        "/generate",
        with_images(1, [b64(PNG)], max_new_tokens=2) | {"inputs": "<img></img>" + "fox " * 70_000},
        400,
        "characters alone hold",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "fox " * 70_000}]},
        400,
        "characters alone hold",
    ),
    ("/v1/completions", {"prompt": ["hi", "fox " * 70_000]}, 400, "characters alone hold"),
    ("/generate", with_images(2, [b64(PNG)]), 400, "2 image tag"),
    ("/generate", with_images(0, [b64(PNG)]), 400, "0 image tag"),
    ("/generate", with_images(1, [{"type": "base64", "data": "@@@"}]), 400, "not valid base64"),
    ("/generate", with_images(1, [b64(b"plain text")]), 400, "not an image"),
    ("/generate", with_images(1, [b64(PNG[: len(PNG) // 2])]), 400, "image 0"),
    (
        "/generate",
        with_images(
            1, [b64(with_declared_jpeg_size(encode(gradient(8, 8), "JPEG"), 30000, 30000))]
        ),
        413,
        "too many pixels",
    ),
    ("/generate", with_images(17, [b64(PNG)] * 17), 413, "at most 16"),
    ("/generate", {"inputs": "x" * 1_200_000}, 413, "larger than the limit"),
    (
        "/generate",
        with_images(1, [{"type": "url", "data": "http://127.0.0.1:9/a.png"}]),
        422,
        "non-public address",
    ),
    (
        "/generate",
        with_images(1, [{"type": "url", "data": "http://10.1.2.3/a.png"}]),
        422,
        "non-public address",
    ),
    (
        "/v1/chat/completions",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "data:text/plain,hi"}}],
                }
            ]
        },
        400,
        "data URI",
    ),
    ("/v1/chat/completions", {"messages": "hello"}, 400, "messages"),
    # Lone surrogates, deep nesting: json.loads takes both, the tokenizer and the parser did not.
    ("/generate", b'{"inputs": "a\\ud800b"}', 400, "surrogate"),
    (
        "/generate_stream",
        b'{"inputs": "fox", "parameters": {"stop_sequences": "\\udfff"}}',
        400,
        "surrogate",
    ),
    ("/tokens", b'{"text": "a\\udfffb"}', 400, "surrogate"),
    ("/generate", b'{"inputs": "a\xed\xa0\x80b"}', 400, "not valid JSON"),  # encoded surrogate
    ("/generate", '{"inputs": "a\\ud800b"}'.encode("utf-16-le"), 400, "not valid JSON"),
    (
        "/generate",
        b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        400,
        "nested too deeply",
    ),
    # Values whose cost grows without bound: refused before any work.
    (
        "/generate",
        with_images(1, [b64(PNG)], image_max_patch_num=10**9),
        400,
        "image_max_patch_num",
    ),
    ("/generate", {"inputs": "fox", "parameters": {"stop_sequences": "a" * 20_000}}, 400, "stop"),
    ("/generate", {"inputs": "fox", "parameters": {"stop_sequences": ["ab"] * 65}}, 400, "stop"),
    ("/generate", b'{"inputs": "fox", "parameters": {"temperature": 1e309}}', 400, "finite"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": 1e309},
        400,
        "finite",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"documents": 5}},
        400,
        "chat template",
    ),
    ("/v1/completions", {"prompt": [[1, 2]] * 2100, "max_tokens": 1}, 400, "holds at once"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "n"),
]


def test_bad_inputs_get_clear_4xx_while_a_good_request_streams(tmp_path) -> None:
    checkpoint = make_hf_internvl(tmp_path / "internvl", "qwen2")
    flags = ("--enable_multimodal", "--max_total_token_num", "4096", "--max_request_body_mb", "1")
    server = start_server(checkpoint, tmp_path, *flags, env={"INTERNVL_IMAGE_LENGTH": "4"})
    try:
        good = {
            "inputs": "the quick brown fox",
            "parameters": {"max_new_tokens": STREAM_TOKENS, "ignore_eos": True},
        }
        client = httpx.Client(base_url=server.url, timeout=120)
        expected = client.post("/generate", json=good).json()
        streamed: list[str] = []
        started = threading.Event()

        def stream_beside() -> None:
            with httpx.stream("POST", server.url + "/generate_stream", json=good, timeout=120) as r:
                for line in r.iter_lines():
                    streamed.append(line)
                    started.set()

        beside = threading.Thread(target=stream_beside)
        beside.start()
        assert started.wait(60)
        for route, body, status, fragment in BAD_REQUESTS:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            response = client.post(route, content=content)
            assert response.status_code == status, (route, str(body)[:200], response.text)
            message = response.json()["error"]["message"]
            assert fragment in message, (str(body)[:200], message)
            if route.startswith("/v1/") and fragment == "characters alone hold":
                assert response.json()["error"]["code"] == "context_length_exceeded"
            if route == "/v1/chat/completions" and fragment == "data URI":  # an image's fault
                assert response.json()["error"]["param"] == "messages"
        for name, data in GOOD_IMAGES.items():
            response = client.post("/generate", json=with_images(1, [b64(data)]))
            assert response.status_code == 200, (name, response.text)
        bom_body = {"inputs": "fox", "parameters": {"max_new_tokens": 2}}
        with_bom = b"\xef\xbb\xbf" + json.dumps(bom_body).encode()
        assert client.post("/generate", content=with_bom).status_code == 200
        extreme = {"do_sample": True, "top_k": 2**63, "max_new_tokens": 2}  # keeps every token
        response = client.post("/generate", json={"inputs": "fox", "parameters": extreme})
        assert response.status_code == 200, response.text
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        ignored = {**chat, "chat_template_kwargs": {"messages": []}}  # reserved: ignored
        response = client.post("/v1/chat/completions", json=ignored)
        assert response.status_code == 200, response.text
        beside.join(120)
        client.close()
        events = [json.loads(payload) for payload in sse_payloads(streamed)]
        assert len(events) == STREAM_TOKENS
        assert "".join(e["token"]["text"] for e in events) == expected["generated_text"][0]
        assert_caches_idle(wait_until_idle(server))
        assert server.stop() == 0, server.log()
    finally:
        if server.process.poll() is None:
            server.stop()
