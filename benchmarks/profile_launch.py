"""Where an idle engine's host time goes for one request at a time, by step phase.

The request time line (`request_timeline.py`) found on an H100 that a single request's prefill
step spends 2.6-3.8 ms of host time in `EngineCore.step` before the GPU has all its work, although
the forward is one whole-step CUDA graph. This script builds the engine in-process (`LLM`, the
server's defaults), sends one image request to fill the caches, then runs bench_serving's cached
cases one request at a time (1 greedy token each):
- `same_prompt`: the first prompt again (its prefix cached but the last token);
- `new_question`: the same image and lead text, a new question after them;
- `new_lead`: the same image behind new text (the embedding cached, the prefix not).
For each case it reports the median host milliseconds of the step's phases: scheduling, launching
and, inside the launch, the batch's tensors, the image embeddings, the graph replays, the LM head
and the sampler's launch; then collecting. Then one request of `new_question` traced by
`HostSyncTrace`: the host's CUDA runtime calls (pinned allocations, copies, synchronizations,
graph launches), the longest ones with the operators above them, the operators that synchronize
and the allocators' counters.
A diagnosis tool, not a benchmark of record.

With `--idle_ms 50` each case runs again after a 50 ms pause before every request, the host
asleep, then spinning: what an idle server's first step pays for a host that slept.

    python -m benchmarks.profile_launch --checkpoint VLM_DIR [--reps 8] [--idle_ms 0,50]
        [--out launch.json]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import engine_options, log, make_llm, pick_device, run_metadata, write_json
from benchmarks.host_sync_trace import HostSyncTrace
from benchmarks.workloads import chat_prompt, image_bytes, words

# (owner, method, label): what is timed, the owner's method wrapped in place.
TIMED_CALLS = (
    ("ocula.engine.engine_core", "EngineCore", "step", "step"),
    ("ocula.engine.scheduler", "Scheduler", "schedule", "schedule"),
    ("ocula.engine.model_runner", "ModelRunner", "launch", "launch"),
    ("ocula.engine.model_runner", "ModelRunner", "_update_image_embeddings", "launch.images"),
    ("ocula.engine.model_runner", "ModelRunner", "_build_batch", "launch.batch"),
    ("ocula.engine.piecewise_graphs", "PiecewiseGraphs", "run", "launch.piecewise_graphs"),
    ("ocula.engine.whole_step_graphs", "WholeStepGraphs", "run", "launch.whole_step"),
    ("ocula.engine.cuda_graphs", "DecodeGraphs", "run", "launch.decode_graphs"),
    ("ocula.engine.runner_sampling", "RequestSampler", "follow", "launch.sampler_follow"),
    ("ocula.engine.runner_sampling", "RequestSampler", "sample", "launch.sampler"),
    ("ocula.engine.model_runner", "ModelRunner", "collect", "collect"),
    ("ocula.engine.scheduler", "Scheduler", "update", "update"),
)


class CallTimer:
    """Accumulates the host milliseconds of each wrapped method, call by call."""

    def __init__(self) -> None:
        self.calls: dict[str, list[float]] = defaultdict(list)

    def wrap_all(self) -> None:
        import importlib

        for module, owner, method, label in TIMED_CALLS:
            cls = getattr(importlib.import_module(module), owner)
            setattr(cls, method, self._timed(getattr(cls, method), label))

    def wrap_instance(self, target: Any, method: str, label: str) -> None:
        setattr(target, method, self._timed(getattr(target, method), label))

    def _timed(self, function: Callable[..., Any], label: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.calls[label].append((time.perf_counter() - start) * 1e3)

        return timed

    def take(self) -> dict[str, list[float]]:
        calls, self.calls = dict(self.calls), defaultdict(list)
        return calls


def image_request(lead_seed: int, question_seed: int, picture: bytes) -> dict[str, Any]:
    text = f"{words(lead_seed, 8)}\n<image>\n{words(question_seed, 50)}"
    return {"prompt": chat_prompt(text), "images": [picture]}


def summarize(calls: dict[str, list[float]], requests: int) -> dict[str, Any]:
    """Per label: calls per request, the median call and the host ms per request."""
    return {
        label: {
            "calls_per_request": len(times) / requests,
            "median_ms": round(statistics.median(times), 4),
            "ms_per_request": round(sum(times) / requests, 4),
        }
        for label, times in sorted(calls.items())
    }


def wait(seconds: float, spin: bool) -> None:
    """Pauses the host, asleep or busy (spinning keeps the core awake and its caches warm)."""
    if not spin:
        time.sleep(seconds)
        return
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="an InternVL checkpoint")
    parser.add_argument("--reps", type=int, default=8, help="requests of each case")
    parser.add_argument("--top", type=int, default=30, help="runtime calls to print")
    parser.add_argument(
        "--idle_ms",
        default="0",
        help="comma-separated pauses before each request; each pause > 0 is run twice, the host "
        "sleeping through it and spinning through it (is a step slower after the host idled?)",
    )
    parser.add_argument("--engine_args", default="")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from ocula import SamplingParams

    device = pick_device()
    llm = make_llm(engine_options(args.checkpoint, args.engine_args))
    timer = CallTimer()
    timer.wrap_all()
    model = llm.engine.core.runner.model
    timer.wrap_instance(model, "compute_logits", "launch.lm_head")
    params = SamplingParams(max_new_tokens=1, temperature=0.0)
    picture = image_bytes(7)
    for _ in range(3):  # the first fills the caches; the others warm the cached path
        llm.generate(image_request(1, 2, picture), params)
    cases: dict[str, Callable[[int], dict[str, Any]]] = {
        "same_prompt": lambda _: image_request(1, 2, picture),
        "new_question": lambda rep: image_request(1, 1000 + rep, picture),
        "new_lead": lambda rep: image_request(2000 + rep, 2, picture),
    }
    results: dict[str, Any] = {"meta": run_metadata(device), "reps": args.reps, "cases": {}}
    pauses = [(0.0, "none")]
    for idle_ms in (float(part) for part in args.idle_ms.split(",") if float(part) > 0):
        pauses += [(idle_ms, "sleep"), (idle_ms, "spin")]
    for index, (idle_ms, pause) in enumerate(pauses):
        first_seed = index * args.reps  # each pass's new questions and leads are new to the cache
        for case, make in cases.items():
            name = case if pause == "none" else f"{case}@{idle_ms:g}ms_{pause}"
            timer.take()
            walls = []
            for rep in range(args.reps):
                wait(idle_ms / 1e3, spin=pause == "spin")
                start = time.perf_counter()
                llm.generate(make(first_seed + rep), params)
                walls.append((time.perf_counter() - start) * 1e3)
            summary = summarize(timer.take(), args.reps)
            results["cases"][name] = {"request_ms": statistics.median(walls), "calls": summary}
            log(f"{name}: request {statistics.median(walls):.2f} ms (median of {args.reps})")
            for label, entry in summary.items():
                log(f"  {label:28s} {entry['ms_per_request']:8.3f} ms per request")
    trace = HostSyncTrace(device)
    trace.start()
    llm.generate(cases["new_question"](len(pauses) * args.reps), params)
    report = trace.stop()
    results["new_question_traced"] = report
    for row in report["runtime_calls"][: args.top]:
        log(f"  {row['name'][:50]:50s} x{row['count']:<5d} {row['host_ms']:8.3f} ms")
    for entry in report["warnings"]:
        log(f"  warning x{entry['count']}: {entry['warning'].splitlines()[0][:120]}")
    if args.out:
        write_json(args.out, results)


if __name__ == "__main__":
    main()
