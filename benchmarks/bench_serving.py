"""Serving over HTTP: TTFT and TPOT at fixed request rates, and idle-server TTFT with and without
the image caches.

Starts `python -m ocula.server.api_server --enable_multimodal` on the checkpoint (plus
`--engine_args`), waits for /health, warms it up, then, streaming LightLLM's /generate_stream:
- idle TTFT, one request at a time, each one 448 x 448 image (`--image_side`: 1344 gives each
  image ten tiles) + about 64 text tokens (an 8-word
  lead, the image, a 50-word question), 1 new token; four cases, 5 times each:
  `miss` (new image, new text), `image_cached` (an image already encoded behind a new lead text,
  so the prefix cache cannot reuse the image's KV: the embedding cache saves the ViT only),
  `image_prefix_cached` (the same lead and image, a new question: a follow-up question about an
  image, where the prefix cache serves the lead and the image's KV and only the question is
  computed) and `prompt_cached` (the exact same request again: the prefix cache serves the whole
  prompt);
- rates: Poisson arrivals at each rate for `--duration` seconds, every request a new image +
  question and `--new_tokens` tokens (ignore_eos); TTFT and TPOT (mean gap between a request's
  tokens after the first) p50/p99 over the completed requests. Requests still running
  `--drain` seconds after the last arrival are cancelled and counted.
The three warm-up requests' TTFTs are recorded too (`warmup_ttft_ms`): the first is the first
image the server ever sees. Times are the client's, from just before sending the (pre-encoded)
body.

    python -m benchmarks.bench_serving --checkpoint DIR --out serving.json [--tiny]
        [--image_side 1344]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import shlex
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    Deadline,
    add_common_args,
    exit_on_sigterm,
    log,
    percentile,
    read_json,
    run_metadata,
    run_part,
    write_json,
)
from benchmarks.http_stream import StreamingClient
from benchmarks.serving_client import ServerProcess, StreamResult, generate_body, stream
from benchmarks.workloads import IMAGE_SIDE, chat_prompt, image_bytes, poisson_arrivals, words

# Idle TTFT cases, in the order each repetition sends them (see the module docstring).
IDLE_CASES = ("miss", "image_cached", "image_prefix_cached", "prompt_cached")
FULL = {"rates": "1,4,16", "duration": 15.0, "new_tokens": 128, "drain": 30.0, "reps": 5}
TINY = {"rates": "1,4", "duration": 4.0, "new_tokens": 8, "drain": 30.0, "reps": 2}


def image_request(
    seed: int,
    lead_seed: int,
    new_tokens: int,
    question_seed: int | None = None,
    side: int = IMAGE_SIDE,
) -> bytes:
    """A chat prompt with one side x side JPEG (448: one tile; 1344: a 3 x 3 grid and a
    thumbnail) and ~64 text tokens."""
    question = words(seed + 50_000 if question_seed is None else question_seed, 50)
    text = f"{words(lead_seed, 8)}\n<image>\n{question}"
    picture = base64.b64encode(image_bytes(seed, side)).decode()
    return generate_body(chat_prompt(text), [picture], new_tokens)


def _ms(values: list[float], q: float) -> float | None:
    value = percentile(values, q)
    return None if value is None else value * 1e3


def idle_bodies(seed: int, side: int = IMAGE_SIDE) -> dict[str, bytes]:
    """One request of each idle case, to be sent in IDLE_CASES order (each case but `miss`
    finds what the ones before it left in the caches); a new `seed` for each repetition."""
    first = image_request(seed, seed, 1, side=side)
    return {
        "miss": first,
        "image_cached": image_request(seed, seed + 1000, 1, side=side),
        "image_prefix_cached": image_request(seed, seed, 1, seed + 70_000, side),
        "prompt_cached": first,
    }


async def send_idle_cases(
    url: str, reps: int, first_seed: int, gap_seconds: float = 0.0, side: int = IMAGE_SIDE
) -> list[tuple[str, StreamResult]]:
    """`reps` rounds of `idle_bodies`, one request at a time (`gap_seconds` after each); every
    (case, result) in sending order. Raises if a request fails."""
    sent = []
    async with StreamingClient(url) as client:
        for rep in range(reps):
            for case, body in idle_bodies(first_seed + rep, side).items():
                result = await stream(client, body)
                if not result.ok:
                    raise RuntimeError(f"idle {case} request failed: {result.error}")
                sent.append((case, result))
                if gap_seconds:
                    await asyncio.sleep(gap_seconds)
    return sent


async def idle_ttft(url: str, reps: int, side: int = IMAGE_SIDE) -> dict[str, Any]:
    cases: dict[str, list[float]] = {case: [] for case in IDLE_CASES}
    for case, result in await send_idle_cases(url, reps, 100, side=side):
        cases[case].append(result.ttft)
    summary: dict[str, Any] = {"reps": reps}
    for case, values in cases.items():
        summary[case] = {"p50_ms": _ms(values, 50), "min_ms": min(values) * 1e3}
    miss = summary["miss"]["p50_ms"]
    for case in IDLE_CASES[1:]:
        summary[case]["ratio_to_miss"] = summary[case]["p50_ms"] / miss
    log("idle TTFT p50: " + ", ".join(f"{c} {summary[c]['p50_ms']:.1f} ms" for c in IDLE_CASES))
    return summary


def _outliers(results: list[StreamResult]) -> dict[str, Any]:
    """Where the tails come from: the three slowest first tokens and the longest gap between
    two tokens of one request, each with its time since the first request was sent."""
    if not results:
        return {}
    first_sent = min(r.sent_at for r in results)
    slowest = sorted(results, key=lambda r: r.ttft, reverse=True)[:3]
    gaps = [(b - a, a) for r in results for a, b in itertools.pairwise(r.token_times)]
    longest = max(gaps, default=None)
    return {
        "slowest_ttft": [
            {"sent_at_s": r.sent_at - first_sent, "ttft_ms": r.ttft * 1e3} for r in slowest
        ],
        "longest_token_gap": None
        if longest is None
        else {"ms": longest[0] * 1e3, "at_s": longest[1] - first_sent},
    }


async def at_rate(
    url: str,
    rate: float,
    duration: float,
    new_tokens: int,
    drain: float,
    deadline: Deadline,
    side: int = IMAGE_SIDE,
) -> dict[str, Any]:
    count = max(4, round(rate * duration))
    arrivals = poisson_arrivals(int(rate * 1000), rate, count)
    drain = max(5.0, min(drain, deadline.remaining() - arrivals[-1] - 5))
    seeds = [10_000 * (1 + int(rate)) + i for i in range(count)]
    bodies = [image_request(seed, i, new_tokens, side=side) for i, seed in enumerate(seeds)]
    async with StreamingClient(url) as client:
        loop = asyncio.get_running_loop()
        start = loop.time()

        async def send(at: float, body: bytes) -> StreamResult:
            await asyncio.sleep(max(0.0, start + at - loop.time()))
            return await stream(client, body)

        tasks = [
            asyncio.create_task(send(at, body)) for at, body in zip(arrivals, bodies, strict=True)
        ]
        done, pending = await asyncio.wait(tasks, timeout=arrivals[-1] + drain)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        elapsed = loop.time() - start
    results = [task.result() for task in done]
    ok = [r for r in results if r.ok and len(r.token_times) == new_tokens]
    ttft = [r.ttft for r in ok]
    tpot = [t for t in (r.tpot for r in ok) if t is not None]
    tokens = sum(len(r.token_times) for r in results)
    summary = {
        **_outliers(ok),
        "rate_per_s": rate,
        "requests": count,
        "completed": len(ok),
        "failed": [r.error for r in results if r.error][:5],
        "cancelled_after_drain": len(pending),
        "seconds": elapsed,
        "output_tokens_per_s": tokens / elapsed,
        "ttft_p50_ms": _ms(ttft, 50),
        "ttft_p99_ms": _ms(ttft, 99),
        "tpot_p50_ms": _ms(tpot, 50),
        "tpot_p99_ms": _ms(tpot, 99),
    }
    ttft_p50, tpot_p50 = summary["ttft_p50_ms"], summary["tpot_p50_ms"]
    log(
        f"rate {rate}/s: {len(ok)}/{count} done, TTFT p50 "
        f"{'n/a' if ttft_p50 is None else f'{ttft_p50:.1f}'} ms, TPOT p50 "
        f"{'n/a' if tpot_p50 is None else f'{tpot_p50:.2f}'} ms"
    )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--rates", help="comma-separated requests per second")
    parser.add_argument("--duration", type=float, help="seconds of arrivals per rate")
    parser.add_argument("--new_tokens", type=int)
    parser.add_argument("--log", type=Path, help="server log file")
    parser.add_argument(
        "--image_side",
        type=int,
        default=IMAGE_SIDE,
        help="pixels of each request's square image (448: one tile; 1344: ten)",
    )
    args = parser.parse_args()
    settings = dict(TINY if args.tiny else FULL)
    for name in ("rates", "duration", "new_tokens"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    deadline = Deadline(args.time_limit)
    exit_on_sigterm()
    flags = ["--enable_multimodal", *shlex.split(args.engine_args)]
    log_path = args.log or Path(tempfile.mkdtemp(prefix="ocula-serving-")) / "server.log"
    # No CUDA in this process: the client must not take GPU memory from the server.
    meta = run_metadata(torch.device("cpu"))
    meta["device"] = read_json(args.hardware)["device"] if args.hardware else "(not queried)"
    side = args.image_side
    results: dict[str, Any] = {"meta": meta, "settings": {**settings, "image_side": side}}
    server = ServerProcess(args.checkpoint, flags, log_path)
    results["server_command"] = shlex.join(server.command)
    results["server_log"] = str(log_path)
    try:
        startup_timeout = min(300.0, max(30.0, deadline.remaining() - 30))
        results["startup_seconds"] = server.wait_healthy(startup_timeout)
        log(f"server ready in {results['startup_seconds']:.1f} s on {server.url}")
        warm = [image_request(90 + i, 90 + i, 8, side=side) for i in range(3)]
        warm_ttft = asyncio.run(asyncio.wait_for(send_one_by_one(server.url, warm), timeout=120))
        # The first is the first image the server ever sees: what start-up left undone shows.
        results["warmup_ttft_ms"] = [ttft * 1e3 for ttft in warm_ttft]
        log("warm-up TTFT: " + ", ".join(f"{ttft * 1e3:.1f} ms" for ttft in warm_ttft))

        def idle() -> dict[str, Any]:
            return asyncio.run(idle_ttft(server.url, settings["reps"], side))

        def loaded(rate: float) -> dict[str, Any]:
            duration, new_tokens = settings["duration"], settings["new_tokens"]
            drain = settings["drain"]
            return asyncio.run(
                at_rate(server.url, rate, duration, new_tokens, drain, deadline, side)
            )

        run_part("idle_ttft", results, idle, deadline, 10)
        results["rates"] = {}
        for rate in (float(r) for r in str(settings["rates"]).split(",")):
            needed = settings["duration"] + 10
            run_part(str(rate), results["rates"], lambda r=rate: loaded(r), deadline, needed)
    finally:  # also on SIGTERM (run_all's deadline): the server must not outlive this script
        results["server_exit_code"] = server.stop()
        results["server_log_tail"] = server.tail(10)
        write_json(args.out, results)


async def send_one_by_one(url: str, bodies: list[bytes]) -> list[float]:
    """Sends the bodies one at a time; their TTFTs in seconds."""
    ttfts = []
    async with StreamingClient(url) as client:
        for body in bodies:
            result = await stream(client, body)
            if not result.ok:
                raise RuntimeError(f"warm-up request failed: {result.error}")
            ttfts.append(result.ttft)
    return ttfts


if __name__ == "__main__":
    main()
