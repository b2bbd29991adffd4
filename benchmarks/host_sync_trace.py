"""Finds what makes the host wait for the device (diagnosis for `profile_offline_steps`).

Between `start` and `stop` it records, with torch's profiler, every CUDA runtime call the host
made and how long it took, turns on torch's synchronization debug mode (a warning, whose Python
stack is kept, for each torch operator that synchronizes), and snapshots the device and pinned
host allocators' counters. `stop` reports:
- runtime calls by name: count and host milliseconds (a `cudaStreamSynchronize`,
  `cudaMemcpyAsync` from pageable memory, `cudaFree` or `cudaHostAlloc` that waits shows here);
- the longest single calls with the chain of operators and `record_function` labels above them;
- the warnings raised meanwhile (the synchronizing operators' among them), by distinct stack;
- the allocators' counters that changed (`num_alloc_retries`: the caching allocator freed its
  cache, which synchronizes; `num_host_alloc`: a new pinned block).
"""

from __future__ import annotations

import time
import traceback
import warnings
from collections import Counter, defaultdict
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

LONG_CALL_MS = 0.5  # runtime calls at least this long are listed one by one
MAX_LONG_CALLS = 40
STACK_FRAMES = 8


class HostSyncTrace:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._profiler: Any = None
        self._warnings: Counter[str] = Counter()
        self._memory_before: dict[str, Any] = {}
        self._host_before: dict[str, Any] = {}
        self._catcher: Any = None
        self._sync_mode_before = 0

    @property
    def active(self) -> bool:
        return self._profiler is not None

    def start(self) -> None:
        cuda = self.device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        self._profiler = profile(activities=activities)
        self._profiler.__enter__()
        if cuda:
            self._memory_before = torch.cuda.memory_stats(self.device)
            self._host_before = torch.cuda.host_memory_stats()
            self._sync_mode_before = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
        # Every warning is kept while tracing (with its stack); the filters come back on stop.
        self._catcher = warnings.catch_warnings()
        self._catcher.__enter__()
        warnings.simplefilter("always")
        warnings.showwarning = self._keep_warning

    def stop(self) -> dict[str, Any]:
        """Ends the trace, restores the warning filters and the sync debug mode, and reports."""
        self._catcher.__exit__(None, None, None)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.set_sync_debug_mode(self._sync_mode_before)
        self._profiler.__exit__(None, None, None)
        events = self._profiler.events()
        self._profiler = None
        report: dict[str, Any] = {
            "runtime_calls": runtime_call_totals(events),
            "long_calls": long_runtime_calls(events),
            "warnings": [  # the synchronizing operators' among them
                {"count": count, "warning": text} for text, count in self._warnings.most_common()
            ],
        }
        if cuda:
            report["device_allocator"] = changed_counters(
                self._memory_before, torch.cuda.memory_stats(self.device)
            )
            report["host_allocator"] = changed_counters(
                self._host_before, torch.cuda.host_memory_stats()
            )
        return report

    def _keep_warning(self, message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
        frames = traceback.format_stack(limit=STACK_FRAMES + 2)[:-2]
        self._warnings[f"{category.__name__}: {message}\n{''.join(frames)}"] += 1


def _is_runtime_call(name: str) -> bool:
    return name.startswith(("cuda", "cu")) and not name.startswith("cudnn")


def runtime_call_totals(events: Any) -> list[dict[str, Any]]:
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for event in events:
        if _is_runtime_call(event.name):
            totals[event.name][0] += 1
            totals[event.name][1] += event.cpu_time_total / 1000
    rows = [{"name": name, "count": c, "host_ms": round(ms, 3)} for name, (c, ms) in totals.items()]
    return sorted(rows, key=lambda row: -row["host_ms"])


def long_runtime_calls(events: Any) -> list[dict[str, Any]]:
    calls = [
        e for e in events if _is_runtime_call(e.name) and e.cpu_time_total / 1000 >= LONG_CALL_MS
    ]
    calls.sort(key=lambda e: -e.cpu_time_total)
    rows = []
    for event in calls[:MAX_LONG_CALLS]:
        chain = []
        parent = event.cpu_parent
        while parent is not None:
            chain.append(parent.name)
            parent = parent.cpu_parent
        rows.append(
            {"name": event.name, "host_ms": round(event.cpu_time_total / 1000, 3), "under": chain}
        )
    return rows


def changed_counters(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Counters whose value changed (the `.current`/`.peak` gauges left out)."""
    changed = {}
    for key, value in after.items():
        if key.endswith((".current", ".peak")) or not isinstance(value, int | float):
            continue
        if value != before.get(key, 0):
            changed[key] = value - before.get(key, 0)
    return changed


class TritonCompileLog:
    """Every Triton kernel compiled while installed (a specialization not seen before in this
    process): its name and argument types, and the host seconds the compile took. Compiles
    happen on the launching thread, so a step that compiles waits that long."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._started: dict[Any, float] = {}
        self._previous: tuple[Any, Any] = (None, None)

    def install(self) -> None:
        from triton import knobs

        self._previous = (knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook)
        knobs.runtime.jit_cache_hook = self._before_compile
        knobs.runtime.jit_post_compile_hook = self._after_compile

    def uninstall(self) -> None:
        from triton import knobs

        knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = self._previous

    def take(self) -> list[dict[str, Any]]:
        events, self.events = self.events, []
        return events

    def _before_compile(self, *, key: Any, repr: str, **_: Any) -> bool:
        self._started[key] = time.perf_counter()
        return False  # compile as usual

    def _after_compile(self, *, key: Any, repr: str, **_: Any) -> None:
        started = self._started.pop(key, None)
        seconds = time.perf_counter() - started if started is not None else None
        self.events.append({"kernel": repr, "seconds": seconds})
