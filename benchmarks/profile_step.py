"""Where a decode step's time goes on the host, with the engine's overlap on and off.

For each batch size and each overlap setting (switched on the same engine between runs), it
times `core.step()` and its phases (schedule, launch, collect = waiting for the step's tokens,
update), then profiles a few steps with torch.profiler (host and device) and reports the GPU's
busy time per step, the host calls that wait for the device and the host operations that cost
the most. A diagnosis tool, not a benchmark of record: BENCHMARKS.md numbers come from run_all.

    python -m benchmarks.profile_step --checkpoint DIR [--batches 1,64] [--out profile.json]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks.bench_engine import DECODE_MAX_NEW_TOKENS
from benchmarks.common import Deadline, engine_options, log, make_llm, sync, write_json
from benchmarks.engine_driver import add_to_core, finish, step_until_all_sampled
from benchmarks.gpu_idle import merge
from benchmarks.workloads import token_prompts

# Host calls that block until the device has done (part of) its queued work.
WAITING_CALLS = ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize")
PHASES = {"scheduler": ("schedule", "update"), "runner": ("launch", "collect")}


class PhaseTimer:
    """Wraps the core's phase methods to accumulate their host time."""

    def __init__(self, core: Any) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        for owner_name, methods in PHASES.items():
            owner = getattr(core, owner_name)
            for name in methods:
                setattr(owner, name, self._timed(name, getattr(owner, name)))

    def _timed(self, name: str, method: Any) -> Any:
        def timed(*args: Any) -> Any:
            start = time.perf_counter()
            try:
                return method(*args)
            finally:
                self.seconds[name] += time.perf_counter() - start

        return timed

    def take(self, steps: int) -> dict[str, float]:
        """Mean ms per step of each phase since the last call."""
        result = {name: s / steps * 1e3 for name, s in self.seconds.items()}
        self.seconds.clear()
        return result


def profiled(core: Any, batch: Any, steps: int) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    sync(core.runner.device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            batch.record(core.step())
        sync(core.runner.device)
    device_intervals, waits = [], defaultdict(float)
    for event in prof.profiler.kineto_results.events():
        start, duration = int(event.start_ns()), int(event.duration_ns())
        if "CUDA" in str(event.device_type()):
            device_intervals.append((start, start + duration))
        elif event.name() in WAITING_CALLS:
            waits[event.name()] += duration / 1e6 / steps
    busy = merge(sorted(device_intervals))
    busy_ms = sum(end - start for start, end in busy) / 1e6 / steps
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    return {"gpu_busy_ms_per_step": busy_ms, "waiting_calls_ms_per_step": waits, "table": table}


def measure(llm: Any, batch_size: int, context: int, steps: int, overlap: bool) -> dict[str, Any]:
    core = llm.engine.core
    core.overlap = overlap
    timer = PhaseTimer(core)
    prompts = token_prompts(20 + batch_size, batch_size, context)
    batch = add_to_core(llm.engine, prompts, DECODE_MAX_NEW_TOKENS)
    try:
        step_until_all_sampled(core, batch, Deadline(None))
        for _ in range(4):
            batch.record(core.step())
        timer.take(1)
        sync(core.runner.device)
        start = time.perf_counter()
        for _ in range(steps):
            batch.record(core.step())
        sync(core.runner.device)
        ms = (time.perf_counter() - start) / steps * 1e3
        phases = timer.take(steps)
        prof = profiled(core, batch, 6) if core.runner.device.type == "cuda" else {}
    finally:
        finish(core, batch)
    result = {"batch": batch_size, "overlap": overlap, "ms_per_step": ms, "phases_ms": phases}
    result.update({k: v for k, v in prof.items() if k != "table"})
    log(f"batch {batch_size}, overlap {overlap}: {ms:.2f} ms/step, phases {phases}")
    if prof:
        waits = dict(prof["waiting_calls_ms_per_step"])
        log(f"  GPU busy {prof['gpu_busy_ms_per_step']:.2f} ms/step; host waits (ms) {waits}")
        log(prof["table"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--engine_args", default="")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    llm = make_llm(engine_options(args.checkpoint, args.engine_args))
    results = []
    for batch_size in (int(b) for b in args.batches.split(",")):
        for overlap in (True, False):
            results.append(measure(llm, batch_size, args.context, args.steps, overlap))
    if args.out is not None:
        write_json(args.out, {"checkpoint": str(args.checkpoint), "runs": results})


if __name__ == "__main__":
    main()
