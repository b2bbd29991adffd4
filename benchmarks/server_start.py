"""How long the HTTP server takes to start (launch to the first /health 200) and to stop
(SIGTERM to exit), one server at a time, for one or more source trees taking turns.

    python -m benchmarks.server_start --checkpoint DIR --rounds 3 --out start.json \
        [--tree new=. --tree base=/tmp/base_tree] [--server_args=--enable_multimodal]

Each tree is a folder holding an `ocula` package (a `git archive` of another commit, say),
put first on the server's PYTHONPATH; without `--tree` the installed `ocula` runs. The servers
run from a scratch folder, so that the current folder's `ocula` does not shadow the tree's.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import log, write_json
from benchmarks.serving_client import ServerProcess

HEALTH_TIMEOUT_SECONDS = 600
STOP_TIMEOUT_SECONDS = 60


def start_and_stop(
    checkpoint: Path, tree: Path | None, server_args: list[str], log_path: Path
) -> dict[str, Any]:
    """One server's start and stop: seconds to healthy (None if it never was), seconds from
    SIGTERM to exit, and its exit code (None when it had to be killed)."""
    env = {}
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(tree.resolve()), os.environ.get("PYTHONPATH")) if p
        )
    with tempfile.TemporaryDirectory() as scratch:
        started = time.monotonic()
        server = ServerProcess(checkpoint, server_args, log_path, env=env, cwd=Path(scratch))
        healthy: float | None = None
        try:
            server.wait_healthy(HEALTH_TIMEOUT_SECONDS, poll_seconds=0.05)
            healthy = time.monotonic() - started
        except (RuntimeError, TimeoutError) as error:
            log(f"no healthy server: {error}")
        signalled = time.monotonic()
        code = server.stop(STOP_TIMEOUT_SECONDS)
    return {
        "healthy_s": None if healthy is None else round(healthy, 3),
        "stop_s": round(time.monotonic() - signalled, 3),
        "exit_code": code,
    }


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the runs after the first (the first also warms the page cache)."""
    later = runs[1:] or runs
    healthy = [r["healthy_s"] for r in later if r["healthy_s"] is not None]
    return {
        "healthy_s_median_after_first": statistics.median(healthy) if healthy else None,
        "stop_s_median_after_first": statistics.median(r["stop_s"] for r in later),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tree", action="append", default=[], help="label=folder; repeatable")
    parser.add_argument(
        "--server_args",
        default="",
        help='more server flags, one string, given with "=": --server_args="--enable_multimodal"',
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    trees: dict[str, Path | None] = {"installed": None}
    if args.tree:
        trees = {label: Path(folder) for label, folder in (t.split("=", 1) for t in args.tree)}
    server_args = shlex.split(args.server_args)
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in trees}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for round_index in range(args.rounds):
        for label, tree in trees.items():
            log_path = args.out.with_name(f"{args.out.stem}-{label}-{round_index}.log")
            runs[label].append(start_and_stop(args.checkpoint, tree, server_args, log_path))
            log(f"{label} round {round_index}: {runs[label][-1]}")
    import torch  # after the runs: the metadata's device name, not a competitor of theirs

    from benchmarks.common import pick_device, run_metadata

    write_json(
        args.out,
        {
            **run_metadata(pick_device()),
            "what": "server start (launch to /health 200) and stop (SIGTERM to exit)",
            "checkpoint": str(args.checkpoint),
            "server_args": server_args,
            "torch": torch.__version__,
            "runs": runs,
            "summary": {label: _summary(r) for label, r in runs.items()},
        },
    )


if __name__ == "__main__":
    main()
