"""How much of a decode step the GPU spends idle, from a torch.profiler trace of device activity.

The profiler (CUDA activity only, so the host side runs at nearly full speed) records every
kernel, memcpy and memset on the GPU during a few engine steps. Their intervals are merged
(overlapping streams count once) into the GPU's busy time. Two idle fractions come out:
- `idle_fraction`: 1 - busy time per step / step wall time measured *without* the profiler
  (the decode benchmark's ms/step at the same batch): the number the goal is about;
- `idle_fraction_in_trace`: 1 - busy / (last activity end - first activity start) inside the
  profiled steps themselves (includes the profiler's own overhead, so it reads higher).
The largest gaps between consecutive busy intervals are listed to show where the time goes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch


def _device_intervals(prof: Any) -> list[tuple[int, int]]:
    """(start_ns, end_ns) of every GPU activity in a finished profile."""
    intervals = []
    for event in prof.profiler.kineto_results.events():
        if "CUDA" not in str(event.device_type()):
            continue
        start = int(event.start_ns())
        intervals.append((start, start + int(event.duration_ns())))
    return sorted(intervals)


def merge(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, non-overlapping union of sorted intervals."""
    merged: list[tuple[int, int]] = []
    for start, end in intervals:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def profile_busy(
    run_steps: Callable[[], None], steps: int, step_ms: float, min_kernels_per_step: int
) -> dict[str, Any]:
    """Profiles `run_steps` (which runs `steps` engine steps) on the current CUDA device;
    `step_ms` is the unprofiled wall time of one such step. Fewer than `min_kernels_per_step`
    GPU activities per step (say, one per layer) means the trace missed kernels, e.g. those
    replayed from CUDA graphs: the result is then marked suspect."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run_steps()
        torch.cuda.synchronize()
    raw = _device_intervals(prof)
    if not raw:
        return {"error": "the profiler recorded no GPU activity"}
    busy = merge(raw)
    busy_ns = sum(end - start for start, end in busy)
    window_ns = busy[-1][1] - busy[0][0]
    gaps = sorted((b[0] - a[1] for a, b in itertools.pairwise(busy)), reverse=True)
    busy_ms_per_step = busy_ns / 1e6 / steps
    per_step = len(raw) / steps
    suspect = None
    if per_step < min_kernels_per_step:
        suspect = (
            f"only {per_step:.0f} GPU activities per step were traced (expected at least "
            f"{min_kernels_per_step}): kernels replayed from CUDA graphs may be missing"
        )
    return {
        "suspect": suspect,
        "steps": steps,
        "gpu_activities_per_step": per_step,
        "gpu_busy_ms_per_step": busy_ms_per_step,
        "step_ms_unprofiled": step_ms,
        "idle_fraction": max(0.0, 1.0 - busy_ms_per_step / step_ms),
        "idle_fraction_in_trace": 1.0 - busy_ns / window_ns,
        "largest_gaps_us": [g / 1e3 for g in gaps[:8]],
        "gaps_over_20us": sum(1 for g in gaps if g > 20_000),
    }
