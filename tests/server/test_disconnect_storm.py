"""200 streaming requests, a random half of which leave midway: the others complete correctly and
afterwards KV, prefix-cache references and in-flight counts are back to idle."""

from __future__ import annotations

import asyncio
import json
import random
import re
import time

import httpx

from ocula import LLM, SamplingParams

LEAVER_MAX_NEW_TOKENS = 400
PROMPTS = ["the quick brown fox", "servers stream tokens", "Numbers like 12", "why? because"]


def metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match[1]) if match else 0.0  # a labelled counter appears at its first count


async def one_request(
    client: httpx.AsyncClient, prompt: str, leave_after: int | None
) -> str | None:
    # A client that leaves asks for far more tokens than it reads, so its request cannot finish
    # before the server notices the disconnect (which would count it as completed, not aborted).
    max_new_tokens = 12 if leave_after is None else LEAVER_MAX_NEW_TOKENS
    body = {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, "ignore_eos": True}}
    text = []
    async with client.stream("POST", "/generate_stream", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line[len("data:") :])
            text.append(event["token"]["text"])
            if leave_after is not None and len(text) >= leave_after:
                return None  # leaving the block closes the connection mid-stream
    return "".join(text)


def test_half_of_200_streams_disconnect_and_nothing_leaks(server, tiny_checkpoint) -> None:
    rng = random.Random(0)
    plan = [(PROMPTS[i % 4], rng.choice([None, rng.randint(1, 6)])) for i in range(200)]

    async def run_all() -> list[str | None]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(one_request(client, p, leave) for p, leave in plan))

    aborted_before = metric(server, 'ocula_requests_total{status="aborted"}')
    results = asyncio.run(run_all())
    llm = LLM(str(tiny_checkpoint("llama")), max_total_token_num=1024)
    greedy = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    expected = {prompt: llm.generate(prompt, greedy)[0].text for prompt in PROMPTS}
    finished = [(p, r) for (p, _), r in zip(plan, results, strict=True) if r is not None]
    assert len(finished) >= 80
    for prompt, text in finished:
        assert text == expected[prompt]
    deadline = time.monotonic() + 20
    while metric(server, "ocula_requests_in_flight") or metric(
        server, "ocula_kv_cache_usage_ratio"
    ):
        assert time.monotonic() < deadline, "requests or KV still held after the storm"
        time.sleep(0.2)
    left = sum(1 for _, leave in plan if leave is not None)
    aborted = metric(server, 'ocula_requests_total{status="aborted"}') - aborted_before
    assert aborted == left
    # Every prefix-cache entry is unreferenced again (evictable == all cached tokens).
    assert metric(server, "ocula_prefix_cache_evictable_tokens") == metric(
        server, "ocula_prefix_cache_tokens"
    )
