"""Where an idle request's time to first token goes, across the client, the front and the engine.

Starts the server through `timeline_server` (the server with `timeline_marks` installed in both
of its processes), warms it up as bench_serving does, then sends bench_serving's idle cases one
request at a time (`miss`, `image_cached`, `image_prefix_cached`, `prompt_cached`; each a
448 x 448 image (`--image_side`) and ~64 text tokens, 1 new token), `--reps` of each. Every mark
falls on one clock (`time.perf_counter`, CLOCK_MONOTONIC); for each case it reports the median
time from the client's send to each mark up to the first token, the k-th occurrence of a mark
named `#k` (an idle request's first token takes several engine steps). A diagnosis tool: the
TTFTs of record come from bench_serving.

    python -m benchmarks.request_timeline --checkpoint DIR --out timeline.json [--reps 15]
        [--image_side 1344]
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import statistics
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_serving import IDLE_CASES, image_request, send_idle_cases, send_one_by_one
from benchmarks.common import log, run_metadata, write_json
from benchmarks.serving_client import ServerProcess
from benchmarks.timeline_marks import MARKS_DIR_ENV, read_marks
from benchmarks.workloads import IMAGE_SIDE

# A pause between requests, so that each finds the engine idle.
GAP_SECONDS = 0.05


def timeline(
    requests: list[tuple[str, float, float]], marks: list[tuple[float, str]]
) -> dict[str, Any]:
    """Per case: TTFT p50 and, for each mark seen between a request's send and its first
    token, how many requests saw it and its median offset from the send, in time order."""
    offsets: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    ttfts: dict[str, list[float]] = defaultdict(list)
    for case, sent_at, first_token in requests:
        ttfts[case].append((first_token - sent_at) * 1e3)
        seen: Counter[str] = Counter()
        for stamp, name in marks:
            if sent_at <= stamp <= first_token:
                seen[name] += 1
                offsets[case][f"{name}#{seen[name]}"].append((stamp - sent_at) * 1e3)
    report: dict[str, Any] = {}
    for case in IDLE_CASES:
        rows = [
            {"mark": mark, "requests": len(values), "p50_ms": statistics.median(values)}
            for mark, values in offsets[case].items()
        ]
        report[case] = {
            "ttft_p50_ms": statistics.median(ttfts[case]),
            "marks": sorted(rows, key=lambda row: row["p50_ms"]),
        }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--reps", type=int, default=15, help="requests of each case")
    parser.add_argument("--engine_args", default="", help="more server flags")
    parser.add_argument("--log", type=Path, help="server log file")
    parser.add_argument(
        "--image_side", type=int, default=IMAGE_SIDE, help="pixels of the square images (448)"
    )
    args = parser.parse_args()
    marks_dir = Path(tempfile.mkdtemp(prefix="ocula-timeline-"))
    log_path = args.log or marks_dir / "server.log"
    flags = ["--enable_multimodal", *shlex.split(args.engine_args)]
    server = ServerProcess(
        args.checkpoint,
        flags,
        log_path,
        module="benchmarks.timeline_server",
        env={MARKS_DIR_ENV: str(marks_dir)},
    )
    # No CUDA in this process (the client must not take GPU memory from the server), so the
    # GPU is not named here, as in bench_serving without --hardware.
    meta = run_metadata(torch.device("cpu"))
    meta["device"] = "(not queried)"
    results: dict[str, Any] = {"meta": meta, "reps": args.reps, "image_side": args.image_side}
    results["server_command"] = shlex.join(server.command)
    try:
        server.wait_healthy(300)
        warm = [image_request(90 + i, 90 + i, 8, side=args.image_side) for i in range(3)]
        asyncio.run(send_one_by_one(server.url, warm))
        started = time.perf_counter()
        sent = asyncio.run(
            send_idle_cases(server.url, args.reps, 200, GAP_SECONDS, args.image_side)
        )
        requests = [(case, r.sent_at, r.token_times[0]) for case, r in sent]
    finally:
        results["server_exit_code"] = server.stop()
    marks = [(stamp, name) for stamp, name in read_marks(marks_dir) if stamp >= started]
    results["cases"] = timeline(requests, marks)
    write_json(args.out, results)
    for case, summary in results["cases"].items():
        log(f"{case}: TTFT p50 {summary['ttft_p50_ms']:.2f} ms")
        for row in summary["marks"]:
            log(f"  {row['p50_ms']:8.2f} ms  {row['mark']} ({row['requests']} requests)")


if __name__ == "__main__":
    main()
