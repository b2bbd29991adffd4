"""A cached-image request's engine step timed without a profiler: where its GPU waits.

`torch.profiler` traces cost time of their own, most visibly on CUDA graph launches (a trace read
373 us for the launch of a whole-step graph whose replay holds the host 16-73 us untraced). Here
an in-process engine (`LLM`, server defaults) serves two kinds of request one at a time, each a
new question (~60 tokens; `--question_words`) after a prefix the cache holds: `new_question` (a
short lead and a 448 px image) and `long_history` (~3k tokens of earlier chat and the image).
The runner is wrapped to record a CUDA event and the host clock at: the step's launch, the
forward (the whole-step graph's replay, or the eager model's forward), the end of launch (LM
head and sampler queued) and the end of collect. Reported per mark, medians over `--reps`
requests, in ms from the launch's start: host clock and GPU time (on a CPU, host only). The
forward's GPU time is `forward.end - forward.start`; `forward.start` is how long the GPU waited
for the host's setup.

    python -m benchmarks.profile_step_events --checkpoint /dev/shm/ocula-bench/internvl3-8b \\
        --out events.json [--switches short_chunk_blocks=off]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    add_switches_arg,
    apply_switches,
    engine_options,
    log,
    make_llm,
    pick_device,
    run_metadata,
    write_json,
)
from benchmarks.workloads import chat_prompt, image_bytes, words
from ocula import SamplingParams


class StepMarks:
    """Host clock and (on CUDA) an event at each named point of the runner's step."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.points: list[tuple[str, float, Any]] = []

    def mark(self, name: str) -> None:
        event = None
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        self.points.append((name, time.perf_counter(), event))

    def around(self, owner: Any, attribute: str, name: str) -> None:
        """Wraps owner.attribute (a callable) with marks `name`.start / `name`.end."""
        base = getattr(owner, attribute)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self.mark(f"{name}.start")
            result = base(*args, **kwargs)
            self.mark(f"{name}.end")
            return result

        setattr(owner, attribute, wrapped)

    def read(self) -> dict[str, dict[str, float]]:
        """ms from the first launch's start to each mark's first occurrence."""
        names = [name for name, _, _ in self.points]
        _, host0, event0 = self.points[names.index("launch.start")]
        if self.cuda:
            torch.cuda.synchronize()
        row: dict[str, dict[str, float]] = {}
        for name, host, event in self.points:
            if name in row:
                continue
            row[name] = {"host_ms": (host - host0) * 1e3}
            if event is not None:
                row[name]["gpu_ms"] = event0.elapsed_time(event)
        return row


def instrument(llm: Any, marks: StepMarks) -> None:
    runner = llm.engine.core.runner
    marks.around(runner, "launch", "launch")
    base_collect = runner.collect

    def collect(pending: Any) -> Any:
        result = base_collect(pending)
        marks.mark("collect.end")
        return result

    runner.collect = collect
    graphs = runner.piecewise_graphs
    if graphs is None:  # eager forwards (CPU, --disable_cudagraph)
        marks.around(runner.model, "forward", "forward")
        return
    for graph, _ in graphs.whole_steps.graphs.values():
        marks.around(graph, "replay", "forward")


def measure(
    llm: Any, request: Callable[[int], dict[str, Any]], marks: StepMarks, reps: int
) -> dict[str, Any]:
    params = SamplingParams(max_new_tokens=1, temperature=0.0)
    for _ in range(3):  # caches the prefix, compiles what the first use compiles
        llm.generate(request(2), params)
    rows = []
    for rep in range(reps):
        marks.points.clear()
        start = time.perf_counter()
        llm.generate(request(700 + rep), params)
        wall_ms = (time.perf_counter() - start) * 1e3
        rows.append({"wall_ms": wall_ms, "marks": marks.read()})
    summary: dict[str, Any] = {"wall_ms": statistics.median(row["wall_ms"] for row in rows)}
    for name in rows[-1]["marks"]:
        values = [row["marks"][name] for row in rows if name in row["marks"]]
        summary[name] = {key: statistics.median(v[key] for v in values) for key in values[0]}
        log(f"  {name:15s} " + "  ".join(f"{k} {v:7.3f}" for k, v in summary[name].items()))
    if "forward.end" in summary and "gpu_ms" in summary["forward.end"]:
        summary["forward_gpu_ms"] = (
            summary["forward.end"]["gpu_ms"] - summary["forward.start"]["gpu_ms"]
        )
        log(f"  forward on the GPU {summary['forward_gpu_ms']:.3f} ms")
    log(f"  request (in-process) {summary['wall_ms']:.2f} ms")
    return {"summary": summary, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="an InternVL checkpoint")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reps", type=int, default=12, help="requests of each kind")
    parser.add_argument("--history_words", type=int, default=2400, help="long_history's chat")
    parser.add_argument(
        "--question_words", type=int, default=50, help="the new question (~60 tokens)"
    )
    parser.add_argument("--engine_args", default="", help="engine flags")
    add_switches_arg(parser)
    args = parser.parse_args()
    switches = apply_switches(args.switches)
    device = pick_device()
    llm = make_llm(engine_options(args.checkpoint, args.engine_args))
    marks = StepMarks(device)
    instrument(llm, marks)
    picture = image_bytes(7)
    history = words(3, args.history_words)

    def new_question(seed: int) -> dict[str, Any]:
        return {"prompt": chat_prompt(f"{words(1, 8)}\n<image>\n{words(seed, args.question_words)}"),
                "images": [picture]}  # fmt: skip

    def long_history(seed: int) -> dict[str, Any]:
        return {"prompt": chat_prompt(f"{history}\n<image>\n{words(seed, args.question_words)}"),
                "images": [picture]}  # fmt: skip

    results: dict[str, Any] = {"meta": run_metadata(device), "switches": switches}
    for name, request in (("new_question", new_question), ("long_history", long_history)):
        log(f"{name}:")
        results[name] = measure(llm, request, marks, args.reps)
    write_json(args.out, results)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
