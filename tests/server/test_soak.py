"""Soak: 3000 mixed requests against one tiny InternVL server (text and images, LightLLM and
OpenAI routes, streamed and whole, repeated images, clients that leave midway). Every request
that stays gets a correct answer, and from the end of a warm-up to the end of the run neither
process grows beyond a bound in memory or open descriptors; no /dev/shm entry is left behind and
the KV pool, prefix cache and image-embedding cache are back to idle."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections import defaultdict

import httpx

from tests.helpers.server import RunningServer, assert_all_gone, start_server
from tests.helpers.tiny_internvl import make_hf_internvl
from tests.server.load_tools import (
    assert_caches_idle,
    metrics,
    new_shm_entries,
    png_base64,
    resources,
    server_processes,
    shm_entries,
    sse_payloads,
    wait_for_fds,
    wait_until_idle,
)

TOTAL_REQUESTS = 3000
WARM_UP_REQUESTS = 400
CONCURRENCY = 16
CACHE_CAPACITY = 8
# 24 distinct images for an 8-entry embedding cache: hits, misses and evictions all happen;
# image 0 is sent far more often than the others. The text before an image repeats often
# enough for prefix-cache hits that cover images, and varies enough for embedding-cache hits.
IMAGES = [png_base64(56 * (1 + seed % 2), seed) for seed in range(24)]
PROMPTS = ["the quick brown fox", "servers stream tokens", "numbers like 12", "why? because"]
# Growth allowed from the end of the warm-up to the end of the run, per process. Keeping what one
# image request carries (its 12-49 KiB base64 body in the front; its image bytes, decoded pixels
# or tiles in either process) would grow a process by more than this over the ~1200 image
# requests after the warm-up; measured growth is about 1 MiB (allocator noise).
RSS_GROWTH_MIB = 24
LEAVING_TOKENS = 64  # requests whose client leaves ask for more tokens than they wait for
LEAVE_AFTER_SECONDS = 0.1
FD_SLACK = 4


SERVER_FLAGS = (
    "--enable_multimodal",
    "--cache_capacity",
    str(CACHE_CAPACITY),
    "--visual_infer_batch_size",
    "4",
    "--max_total_token_num",
    "4096",
    "--max_req_total_len",
    "512",
)


def plan(seed: int, count: int) -> list[tuple[str, str, tuple[int, ...], int]]:
    """(kind, prompt, image indices, max new tokens) of each request."""
    rng = random.Random(seed)
    kinds = ["generate", "stream", "stream_leave", "generate_leave", "chat", "chat_stream"]
    kinds.append("generate_images")
    weights = [30, 14, 6, 3, 22, 10, 15]
    requests = []
    for _ in range(count):
        kind = rng.choices(kinds, weights)[0]
        images: tuple[int, ...] = ()
        if kind.startswith("chat") or kind == "generate_images":
            hot = rng.random() < 0.3
            images = (0,) if hot else (rng.randrange(len(IMAGES)),)
            if kind == "generate_images" and rng.random() < 0.3:
                images += (rng.randrange(len(IMAGES)),)
        prompt = rng.choice(PROMPTS)
        if images and rng.random() < 0.6:  # other text before the image: no prefix-cache hit
            prompt = f"request {rng.randrange(200)}: {prompt}"
        requests.append((kind, prompt, images, rng.randint(1, 4)))
    return requests


def chat_body(prompt: str, images: tuple[int, ...], max_tokens: int, stream: bool) -> dict:
    parts = [{"type": "text", "text": prompt}] + [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + IMAGES[i]}}
        for i in images
    ]
    return {
        "messages": [{"role": "user", "content": parts}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }


def lightllm_body(prompt: str, images: tuple[int, ...], max_new_tokens: int) -> dict:
    tags = "".join("<img></img>" for _ in images)
    return {
        "inputs": prompt + tags,
        "parameters": {"max_new_tokens": max_new_tokens, "ignore_eos": True},
        "multimodal_params": {"images": [{"type": "base64", "data": IMAGES[i]} for i in images]},
    }


async def read_events(
    client: httpx.AsyncClient, route: str, body: dict, leave: bool
) -> list[str] | None:
    """The payloads of a stream's events; None when `leave` (the client leaves after the first
    event, closing the connection mid-stream)."""
    async with client.stream("POST", route, json=body) as response:
        assert response.status_code == 200, await response.aread()
        lines = []
        async for line in response.aiter_lines():
            lines.append(line)
            if leave and line.startswith("data:"):
                return None
    return sse_payloads(lines)


async def send(client: httpx.AsyncClient, request: tuple) -> str | None:
    """The request's text, its length checked; None for a client that left midway."""
    kind, prompt, images, n = request
    if kind in ("generate", "generate_images"):
        response = await client.post("/generate", json=lightllm_body(prompt, images, n))
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["count_output_tokens"] == n, body
        return body["generated_text"][0]
    if kind == "chat":
        body = chat_body(prompt, images, n, stream=False)
        response = await client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["usage"]["completion_tokens"] == n, body
        return body["choices"][0]["message"]["content"]
    if kind == "chat_stream":
        body = chat_body(prompt, images, n, stream=True)
        body["stream_options"] = {"include_usage": True}
        payloads = await read_events(client, "/v1/chat/completions", body, leave=False)
        assert payloads is not None and payloads[-1] == "[DONE]", payloads
        chunks = [json.loads(payload) for payload in payloads[:-1]]
        assert chunks[-1]["usage"]["completion_tokens"] == n, chunks[-1]
        deltas = [choice["delta"] for chunk in chunks for choice in chunk["choices"]]
        return "".join(delta.get("content") or "" for delta in deltas)
    if kind == "generate_leave":  # gives up while the request runs: the connection closes
        body = lightllm_body(prompt, images, LEAVING_TOKENS)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(client.post("/generate", json=body), LEAVE_AFTER_SECONDS)
        return None
    if kind == "stream_leave":
        body = lightllm_body(prompt, images, LEAVING_TOKENS)
        assert await read_events(client, "/generate_stream", body, leave=True) is None
        return None
    payloads = await read_events(
        client, "/generate_stream", lightllm_body(prompt, images, n), False
    )
    assert payloads is not None
    events = [json.loads(payload) for payload in payloads]
    assert len(events) == n and events[-1]["finished"], events
    return "".join(event["token"]["text"] for event in events)


async def run_phase(server: RunningServer, requests: list[tuple]) -> dict[tuple, set[str]]:
    """Sends `requests` from CONCURRENCY clients; returns the texts seen per distinct request."""
    texts: dict[tuple, set[str]] = defaultdict(set)
    queue: asyncio.Queue[tuple] = asyncio.Queue()
    for request in requests:
        queue.put_nowait(request)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            request = queue.get_nowait()
            text = await send(client, request)
            if text is not None:
                texts[request].add(text)

    limits = httpx.Limits(max_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(CONCURRENCY)))
    return texts


def image_cache_passes(server: RunningServer) -> tuple[float, float]:
    """Sends CACHE_CAPACITY fresh images one by one, then the same images behind other text
    (no prefix-cache hit on them); returns the embedding-cache misses of each pass. If a
    request had left a reference on an older entry, that entry could not be evicted, one fresh
    image would have been evicted instead, and the second pass would miss it."""
    fresh = [png_base64(56, 1000 + i) for i in range(CACHE_CAPACITY)]
    misses = []
    for text in ("first pass", "second pass, other words"):
        before = metrics(server)["ocula_image_cache_misses_total"]
        for image in fresh:
            body = {
                "inputs": text + "<img></img>",
                "parameters": {"max_new_tokens": 1},
                "multimodal_params": {"images": [{"type": "base64", "data": image}]},
            }
            response = httpx.post(server.url + "/generate", json=body, timeout=60)
            assert response.status_code == 200, response.text
        misses.append(metrics(server)["ocula_image_cache_misses_total"] - before)
    return misses[0], misses[1]


def test_3000_mixed_requests_leave_nothing_behind(tmp_path) -> None:
    checkpoint = make_hf_internvl(tmp_path / "internvl", "qwen2")
    shm_before = shm_entries()
    server = start_server(checkpoint, tmp_path, *SERVER_FLAGS, env={"INTERNVL_IMAGE_LENGTH": "4"})
    try:
        processes = server_processes(server)
        children = processes["front"].children(recursive=True)
        requests = plan(0, TOTAL_REQUESTS)
        texts = asyncio.run(run_phase(server, requests[:WARM_UP_REQUESTS]))
        wait_until_idle(server)
        warm = resources(processes)
        later = asyncio.run(run_phase(server, requests[WARM_UP_REQUESTS:]))
        idle = wait_until_idle(server)
        fds = wait_for_fds(processes, {n: r.open_fds + FD_SLACK for n, r in warm.items()})
        end = resources(processes)
        for name in processes:
            grown = end[name].rss_mib - warm[name].rss_mib
            assert grown <= RSS_GROWTH_MIB, (name, warm[name], end[name])
            assert fds[name] <= warm[name].open_fds + FD_SLACK, (name, warm[name], fds[name])
        assert_caches_idle(idle)
        assert idle["ocula_image_cache_entries"] <= CACHE_CAPACITY, idle
        assert image_cache_passes(server) == (CACHE_CAPACITY, 0)
        for request, seen in later.items():
            texts[request] |= seen
        # Greedy: the same request gets the same text however it was batched or cached.
        differing = {request: seen for request, seen in texts.items() if len(seen) > 1}
        assert not differing, differing
        left = sum(1 for request in requests if request[0].endswith("_leave"))
        aborted = idle.get('ocula_requests_total{status="aborted"}', 0.0)
        assert aborted >= left / 2, (aborted, left)  # the others finished before they left
        assert server.log().count(": 499, the client left") == aborted
        assert idle['ocula_requests_total{status="ok"}'] >= TOTAL_REQUESTS - left
        assert server.stop() == 0, server.log()
        assert_all_gone(children)
        assert not new_shm_entries(shm_before)
    finally:
        if server.process.poll() is None:
            server.stop()
