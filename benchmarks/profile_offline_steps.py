"""Where an offline workload's time goes, step by step (diagnosis, not part of `run_all`).

Runs bench_offline.py's workloads (multimodal, then its text twin) through the in-process engine
once each, after the same warm-up (`bench_offline.warm_up`), and records for every
`EngineCore.step` its wall time and what its plan held: prefill tokens, decode sequences, images
sent to the vision encoder. Reports:
- the time `add_requests` took (tokenizing, decoding every image to check it) before the first
  step;
- wall time summed by step kind (prefill / decode / with images), and the time spent between
  steps (`LLMEngine.step`'s output handling);
- inside the steps, the host time of scheduling (and of waiting there for image tiles), of
  launching (the image encoder's calls included: they queue GPU work and return) and of
  collecting the sampled tokens (which waits for the GPU).
Comparing the multimodal run's steps with the text run's shows the cost the images add.

    python -m benchmarks.profile_offline_steps --checkpoint VLM_DIR --out steps.json [--tiny]
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_offline import warm_up
from benchmarks.common import Deadline, engine_options, log, make_llm, run_metadata, write_json
from benchmarks.engine_driver import run_offline
from benchmarks.host_sync_trace import HostSyncTrace, TritonCompileLog
from benchmarks.workloads import (
    MULTIMODAL,
    TEXT_ONLY,
    TINY_MULTIMODAL,
    TINY_TEXT_ONLY,
    OfflineWorkload,
)

# Images no earlier run of this script or its warm-up has used.
SECOND_RUN_SEED = 500_009
TRACED_RUN_SEED = 1_000_003


@dataclass
class StepRecord:
    start: float
    end: float
    prefill_tokens: int
    decode_sequences: int
    images: int
    phases: dict[str, float]  # host seconds inside the wrapped calls during this step

    @property
    def kind(self) -> str:
        parts = ["prefill"] if self.prefill_tokens else []
        parts += ["decode"] if self.decode_sequences else []
        parts += ["images"] if self.images else []
        return "+".join(parts) or "empty"


class StepRecorder:
    """Times every `EngineCore.step` and, inside it, the scheduler's `schedule` (with the image
    tiles' `finish_plan` wait), the runner's `launch` (the image encoder's `encode` included)
    and `collect` (waiting for the sampled tokens). Wraps instance attributes only."""

    def __init__(self, engine: Any) -> None:
        core = engine.core
        self.steps: list[StepRecord] = []
        # When set: traced from the next step on, for `trace_steps` steps (`traced` the report).
        self.trace: HostSyncTrace | None = None
        self.trace_steps = 0
        self.traced: dict[str, Any] | None = None
        self.compiles = TritonCompileLog()  # installed by the caller around the runs
        self.compiled: list[dict[str, Any]] = []  # this run's compiles, with their step index
        self._plan: Any = None
        self._phases: dict[str, float] = defaultdict(float)
        core.scheduler.schedule = self._keep_plan(self._timed("schedule", core.scheduler.schedule))
        if core.scheduler.images is not None:
            images = core.scheduler.images
            images.finish_plan = self._timed("tiles_wait", images.finish_plan)
        core.runner.launch = self._timed("launch", core.runner.launch)
        core.runner.collect = self._timed("collect", core.runner.collect)
        encoder = getattr(core.runner, "image_encoder", None)
        if encoder is not None:
            encoder.encode = self._timed("encode", encoder.encode)
        core.step = self._recorded_step(core.step)

    def clear(self) -> None:
        self.steps.clear()
        self.compiled.clear()

    def _timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                if self.trace is None or not self.trace.active:
                    return fn(*args, **kwargs)
                with torch.profiler.record_function(name):  # labels the traced runtime calls
                    return fn(*args, **kwargs)
            finally:
                self._phases[name] += time.perf_counter() - start

        return timed

    def _keep_plan(self, schedule: Callable[[], Any]) -> Callable[[], Any]:
        def recorded() -> Any:
            self._plan = schedule()
            return self._plan

        return recorded

    def _recorded_step(self, step: Callable[[], Any]) -> Callable[[], Any]:
        def recorded() -> Any:
            self._plan = None
            self._phases = defaultdict(float)
            if self.trace is not None and not self.trace.active and self.traced is None:
                self.trace.start()
            start = time.perf_counter()
            try:
                updates = step()
            except BaseException:
                if self.trace is not None and self.trace.active:
                    self.trace.stop()  # leaves the profiler and the warning filters as they were
                raise
            end = time.perf_counter()
            plan = self._plan
            compiles = self.compiles.take()
            if compiles:
                self._phases["triton_compiles"] += len(compiles)
                self._phases["triton_compile_s"] += sum(e["seconds"] or 0.0 for e in compiles)
                self.compiled.extend({**e, "step": len(self.steps)} for e in compiles)
            if plan is not None:
                prefill = sum(s.num_new_tokens for s in plan.sequences if s.num_new_tokens > 1)
                decode = sum(1 for s in plan.sequences if s.num_new_tokens == 1)
                images = len(plan.encoder_inputs)
                self.steps.append(
                    StepRecord(start, end, prefill, decode, images, dict(self._phases))
                )
            if self.trace is not None and self.trace.active and len(self.steps) >= self.trace_steps:
                self.traced = self.trace.stop()
            return updates

        return recorded


def summarize(run: Any, started: float, recorder: StepRecorder) -> dict[str, Any]:
    steps = recorder.steps
    by_kind: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for record in steps:
        kind = by_kind[record.kind]
        kind["steps"] += 1
        kind["seconds"] += record.end - record.start
        for phase, seconds in record.phases.items():
            kind[phase] += seconds
    between = sum(later.start - earlier.end for earlier, later in itertools.pairwise(steps))
    return {
        "seconds": run.seconds,
        "finished": run.finished,
        "add_requests_seconds": steps[0].start - started if steps else None,
        "steps": len(steps),
        "by_kind": {kind: dict(values) for kind, values in by_kind.items()},
        "between_steps_seconds": between,
        "prefill_tokens_per_step": [r.prefill_tokens for r in steps if r.prefill_tokens],
    }


def device_segment_counts(device: torch.device) -> dict[str, int]:
    if device.type != "cuda":
        return {"num_device_alloc": 0, "num_device_free": 0}
    stats = torch.cuda.memory_stats(device)
    return {key: stats.get(key, 0) for key in ("num_device_alloc", "num_device_free")}


def profile(
    engine: Any,
    workload: OfflineWorkload,
    recorder: StepRecorder,
    trace_steps: int = 0,
    seed: int = 7,
) -> dict[str, Any]:
    """Runs `workload` once, every step timed; its first `trace_steps` steps also traced for
    host waits (`host_sync_trace`, slower: the step times of a traced run are not comparable).
    `seed` picks the prompts and images: a run with new images misses the embedding cache."""
    recorder.clear()
    device = engine.core.runner.device
    if trace_steps:
        recorder.trace = HostSyncTrace(device)
        recorder.trace_steps, recorder.traced = trace_steps, None
    prompts = workload.prompts(seed=seed)
    segments_before = device_segment_counts(device)
    started = time.perf_counter()
    run = run_offline(engine, prompts, workload.new_tokens, Deadline(None))
    result = {"workload": vars(workload), **summarize(run, started, recorder)}
    # cudaMalloc / cudaFree calls of the caching allocator during the run (each can wait for
    # the device's queued work).
    segments_after = device_segment_counts(device)
    result["device_segments"] = {
        key: segments_after[key] - segments_before[key] for key in segments_after
    }
    result["triton_compiles"] = list(recorder.compiled)
    if recorder.trace is not None:
        if recorder.trace.active:  # the run had fewer steps
            recorder.traced = recorder.trace.stop()
        result["host_sync_trace"] = recorder.traced
        recorder.trace = None
    kinds = "; ".join(
        f"{kind}: " + ", ".join(f"{name} {value:.3f}" for name, value in values.items())
        for kind, values in result["by_kind"].items()
    )
    log(
        f"{workload.name}: {run.seconds:.2f} s; {len(recorder.compiled)} Triton compiles; "
        f"device segments {result['device_segments']}; "
        f"add_requests {result['add_requests_seconds']:.3f} s; {kinds}; "
        f"between steps {result['between_steps_seconds']:.3f} s"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="the InternVL checkpoint")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--engine_args", default="")
    parser.add_argument("--tiny", action="store_true", help="bench_offline's tiny workloads")
    parser.add_argument(
        "--trace_steps",
        type=int,
        default=0,
        help="also trace the multimodal run's first N steps for host waits (a separate run)",
    )
    args = parser.parse_args()
    llm = make_llm(engine_options(args.checkpoint, args.engine_args))
    engine = llm.engine
    warm_up(engine)
    recorder = StepRecorder(engine)
    recorder.compiles.install()
    try:
        workloads = (TINY_MULTIMODAL, TINY_TEXT_ONLY) if args.tiny else (MULTIMODAL, TEXT_ONLY)
        results: dict[str, Any] = {"meta": run_metadata(engine.core.runner.device)}
        for workload in workloads:
            results[workload.name] = profile(engine, workload, recorder)
        # Once more with new images: what the first run paid once (Triton compiles of shapes the
        # warm-up did not cover, new allocator segments) is not paid again.
        results[f"{workloads[0].name}_again"] = profile(
            engine, workloads[0], recorder, seed=SECOND_RUN_SEED
        )
        if args.trace_steps:
            traced = profile(engine, workloads[0], recorder, args.trace_steps, TRACED_RUN_SEED)
            results[f"{workloads[0].name}_traced"] = traced
            for row in (traced["host_sync_trace"] or {}).get("long_calls", [])[:10]:
                log(f"long call {row['name']} {row['host_ms']} ms under {row['under'][:6]}")
    finally:
        recorder.compiles.uninstall()
    write_json(args.out, results)


if __name__ == "__main__":
    main()
