"""What the load tests (soak, overload burst, shutdown) share: /metrics samples, the server's
processes and their resources, /dev/shm, and reading a stream of server-sent events."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image

from tests.helpers.server import RunningServer

SHM_DIR = Path("/dev/shm")
_SAMPLE_LINE = re.compile(r"^([a-z_]+(?:\{[^}]*\})?) (\S+)$", re.M)


def metrics(server: RunningServer) -> dict[str, float]:
    """Sample name (with its labels) -> value, from /metrics. A labelled counter appears only
    from its first count, so read those with `.get(name, 0.0)`."""
    text = httpx.get(server.url + "/metrics", timeout=30).text
    return {match[1]: float(match[2]) for match in _SAMPLE_LINE.finditer(text)}


def wait_until_idle(server: RunningServer, timeout: float = 30) -> dict[str, float]:
    """Polls /metrics until nothing is in flight, running or waiting and no KV slot is held by a
    request; returns that sample."""
    deadline = time.monotonic() + timeout
    while True:
        sample = metrics(server)
        busy = [
            name
            for name in (
                "ocula_requests_in_flight",
                "ocula_num_requests_running",
                "ocula_num_requests_waiting",
                "ocula_kv_cache_usage_ratio",
            )
            if sample[name] != 0
        ]
        if not busy:
            return sample
        assert time.monotonic() < deadline, f"still busy after {timeout} s: {busy} in {sample}"
        time.sleep(0.1)


def assert_caches_idle(sample: dict[str, float]) -> None:
    """KV and prefix-cache references are back to idle: every KV slot is free or held by the
    prefix cache, and every prefix-cache token is unreferenced (evictable)."""
    assert sample["ocula_kv_cache_usage_ratio"] == 0, sample
    capacity = sample["ocula_kv_cache_capacity_tokens"]
    cached = sample["ocula_prefix_cache_tokens"]
    assert sample["ocula_prefix_cache_evictable_tokens"] == cached, sample
    assert sample["ocula_kv_cache_free_tokens"] + cached == capacity, sample


def server_processes(server: RunningServer) -> dict[str, psutil.Process]:
    """The front (HTTP) process and the engine process (its child that is not multiprocessing's
    resource tracker)."""
    front = psutil.Process(server.process.pid)
    engines = [
        child for child in front.children() if "resource_tracker" not in " ".join(child.cmdline())
    ]
    assert len(engines) == 1, engines
    return {"front": front, "engine": engines[0]}


@dataclass(frozen=True)
class Resources:
    rss_mib: float
    open_fds: int


def resources(processes: dict[str, psutil.Process]) -> dict[str, Resources]:
    return {
        name: Resources(process.memory_info().rss / 2**20, process.num_fds())
        for name, process in processes.items()
    }


def wait_for_fds(
    processes: dict[str, psutil.Process], limits: dict[str, int], timeout: float = 10
) -> dict[str, int]:
    """Polls until every process holds at most its limit of open descriptors (closed client
    connections take a moment to be closed on the server's side); returns the last counts."""
    deadline = time.monotonic() + timeout
    while True:
        counts = {name: process.num_fds() for name, process in processes.items()}
        if all(counts[name] <= limits[name] for name in counts) or time.monotonic() > deadline:
            return counts
        time.sleep(0.2)


def shm_entries() -> set[str]:
    return set(os.listdir(SHM_DIR)) if SHM_DIR.is_dir() else set()


def new_shm_entries(before: set[str]) -> set[str]:
    """Entries of /dev/shm that were not in `before` and are still there a moment later (other
    programs on the machine may create and drop their own in between)."""
    fresh = shm_entries() - before
    if fresh:
        time.sleep(1.0)
        fresh &= shm_entries()
    return fresh


def png_base64(size: int, seed: int) -> str:
    """A size x size PNG of random pixels, base64-encoded."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def sse_payloads(lines: list[str]) -> list[str]:
    """The payloads of `data:` lines (LightLLM writes `data:{...}`, OpenAI `data: {...}`)."""
    return [line[len("data:") :].strip() for line in lines if line.startswith("data:")]


def last_error(payloads: list[str]) -> dict | None:
    """The `error` object of the last JSON event, if it is an error event."""
    for payload in reversed(payloads):
        if payload != "[DONE]":
            return json.loads(payload).get("error")
    return None
