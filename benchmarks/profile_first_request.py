"""What the first image request after start-up pays that later ones do not.

Builds the engine in-process (`LLM`, the server's defaults) and reports:
- the start-up time and the Triton kernels compiled or loaded during it, by kernel;
- the first request's time (one 448 x 448 image and a short question, 1 greedy token with a
  logprob, as LightLLM's /generate_stream asks) against three more with new images;
- what the first request compiled, and its host functions by cumulative time (cProfile): a
  kernel compiled, a CUDA module loaded lazily or a library imported on first use shows here.

Run it twice on a fresh machine to see a cold and then a warm Triton cache; `--warm_up` runs the
server's warm-up request first (`engine/warm_up_request.py`), to see what is left. A diagnosis tool;
the serving numbers of record come from bench_serving (its `warmup_ttft_ms`).

    python -m benchmarks.profile_first_request --checkpoint DIR [--out first.json] [--top 30]
        [--warm_up]
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import pstats
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import log, write_json
from benchmarks.workloads import chat_prompt, image_bytes, words


class CompileLog:
    """Triton's JIT cache hook: every kernel compiled (or loaded from Triton's disk cache)."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str]] = []
        try:
            from triton import knobs
        except ImportError:  # no Triton: nothing compiles
            return

        def record(*, repr: str, **_: object) -> bool:
            self.events.append((time.perf_counter(), repr))
            return False  # compile as usual

        knobs.runtime.jit_cache_hook = record

    def take(self) -> list[tuple[float, str]]:
        events, self.events = self.events, []
        return events


def kernel_name(launch_repr: str) -> str:
    return launch_repr.split("[", 1)[0].split("(", 1)[0]


def image_prompt(seed: int) -> dict[str, Any]:
    text = f"{words(seed, 8)}\n<image>\n{words(seed + 1, 20)}"
    return {"prompt": chat_prompt(text), "images": [image_bytes(seed)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--top", type=int, default=30, help="host functions to list")
    parser.add_argument(
        "--warm_up",
        action="store_true",
        help="run the server's warm-up request first (what the first request still pays after it)",
    )
    args = parser.parse_args()

    from ocula import LLM, SamplingParams

    compiles = CompileLog()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    llm = LLM(str(args.checkpoint), device=device)
    startup_s = time.perf_counter() - started
    startup_kernels = collections.Counter(kernel_name(r) for _, r in compiles.take())
    log(f"start-up {startup_s:.1f} s; Triton kernels: {dict(startup_kernels.most_common())}")
    warm_up_s = None
    if args.warm_up:
        from ocula.engine.warm_up_request import warm_up_engine

        warm_up_s = warm_up_engine(llm.engine.core, llm.engine.model_config, with_image=True)
        warm_up_kernels = collections.Counter(kernel_name(r) for _, r in compiles.take())
        log(f"warm-up request {warm_up_s or 0:.2f} s; Triton kernels: {dict(warm_up_kernels)}")

    params = SamplingParams(temperature=0, max_new_tokens=1, ignore_eos=True, logprobs=1)

    def request_ms(seed: int) -> float:
        prompt = image_prompt(seed)  # the JPEG encode is the client's, not timed
        begin = time.perf_counter()
        llm.generate([prompt], params)
        return (time.perf_counter() - begin) * 1e3

    profiler = cProfile.Profile()
    first_began = time.perf_counter()
    profiler.enable()
    first_ms = request_ms(1)
    profiler.disable()
    first_compiles = [(t - first_began, r) for t, r in compiles.take()]
    later_ms = [request_ms(seed) for seed in (2, 3, 4)]
    later = ", ".join(f"{ms:.1f}" for ms in later_ms)
    log(f"first image request {first_ms:.1f} ms; the next three {later} ms")
    for offset, launch_repr in first_compiles:
        log(f"  compiled during it at +{offset * 1e3:.0f} ms: {kernel_name(launch_repr)}")
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(args.top)
    print(text.getvalue())
    if args.out is not None:
        write_json(
            args.out,
            {
                "startup_s": startup_s,
                "startup_triton_kernels": dict(startup_kernels),
                "warm_up_s": warm_up_s,
                "first_request_ms": first_ms,
                "later_requests_ms": later_ms,
                "first_request_compiles": [kernel_name(r) for _, r in first_compiles],
                "first_request_profile": text.getvalue(),
            },
        )


if __name__ == "__main__":
    main()
