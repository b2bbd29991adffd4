"""How much slower the host runs a request's work after it waited idle, sleeping or spinning:
the reason for `--idle_wait` (`ocula/server/idle_wait.py`).

Two measurements, each a median over many repetitions, in this one process:
- `tokenize`: the prompt of bench_serving's cached-image question (~70 tokens, the checkpoint's
  tokenizer) encoded right after the previous encode, after sleeping 1 / 10 / 50 ms, and after
  spinning 10 / 50 ms (a loop reading the clock);
- `round_trip`: one byte to a child process over a Unix socket pair and back, the child blocking
  in poll or spinning on non-blocking reads, with 0 / 1 / 10 / 50 ms of sleep between pings.

    python -m benchmarks.host_warmth --checkpoint DIR --out warmth.json
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import log, write_json

GAPS_MS = (0, 1, 10, 50)


def _median_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


def _wait(seconds: float, spin: bool) -> None:
    if not spin:
        if seconds:
            time.sleep(seconds)
        return
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def after_waits(work: Callable[[], Any], gap_ms: float, spin: bool, reps: int) -> float:
    """Median µs of `work` run right after waiting `gap_ms` (sleeping or spinning)."""
    samples = []
    for _ in range(reps):
        _wait(gap_ms / 1e3, spin)
        start = time.perf_counter()
        work()
        samples.append(time.perf_counter() - start)
    return _median_us(samples)


def _echo(sock: socket.socket, spin: bool) -> None:
    """The child: sends back every byte until it reads b"q"."""
    sock.setblocking(False)
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    while True:
        if not spin:
            poller.poll(1000)
        try:
            data = sock.recv(16)
        except BlockingIOError:
            continue
        if data in (b"q", b""):
            return
        sock.send(data)


def round_trip(gap_ms: float, child_spins: bool, reps: int) -> float:
    """Median µs of a one-byte ping-pong with a child process (the parent blocks in recv)."""
    parent, child = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child process
        parent.close()
        _echo(child, child_spins)
        os._exit(0)
    child.close()
    samples = []
    try:
        for _ in range(reps):
            if gap_ms:
                time.sleep(gap_ms / 1e3)
            start = time.perf_counter()
            parent.send(b"p")
            parent.recv(16)
            samples.append(time.perf_counter() - start)
    finally:
        parent.send(b"q")
        os.waitpid(pid, 0)
        parent.close()
    return _median_us(samples)


def _reps(gap_ms: float) -> int:
    return 40 if gap_ms >= 50 else 100 if gap_ms >= 10 else 400


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="folder of the tokenizer")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from benchmarks.bench_serving import image_request

    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint, trust_remote_code=True)
    prompt = json.loads(image_request(1, 1, 1, 70_001))["inputs"]
    text = prompt.replace("<image>", "<img><IMG_CONTEXT></img>")

    def encode() -> None:
        tokenizer.encode(text)

    after_waits(encode, 0, False, 200)  # warm
    results: dict[str, Any] = {"cpus": os.cpu_count(), "tokenize_us": {}, "round_trip_us": {}}
    for gap in GAPS_MS:
        results["tokenize_us"][f"sleep_{gap}ms"] = after_waits(encode, gap, False, _reps(gap))
    for gap in GAPS_MS[2:]:
        results["tokenize_us"][f"spin_{gap}ms"] = after_waits(encode, gap, True, _reps(gap))
    for child_spins in (False, True):
        for gap in GAPS_MS:
            key = f"child_{'spins' if child_spins else 'polls'}_gap_{gap}ms"
            results["round_trip_us"][key] = round_trip(gap, child_spins, _reps(gap))
    write_json(args.out, results)
    for kind in ("tokenize_us", "round_trip_us"):
        for key, value in results[kind].items():
            log(f"{kind} {key}: {value:.1f}")


if __name__ == "__main__":
    main()
