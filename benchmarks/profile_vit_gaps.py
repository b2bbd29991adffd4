"""Where the ViT's time goes between and around its kernels: the device's idle gaps inside one
CUDA-graph forward, and the SM clock and power while the encoder and the peak matmul run.

InternViT-300M with random bf16 weights (`profile_vit_gemms.random_vit`) over `--tiles` tiles,
one forward captured in a CUDA graph (as the engine replays it). Under `torch.profiler`, each
replay's kernels in time order give the span (first start to last end), the kernels' summed
durations and every gap between one kernel's end and the next one's start, totalled by the pair
of kernels around it. While replays run back to back for `--sample_s` seconds, NVML samples
the SM clock and the power draw; the same for the 8192^3 bf16 matmul that the MFU divides by,
so a clock the encoder's work holds lower (or higher) than the peak's shows.

    python -m benchmarks.profile_vit_gaps --out vit-gaps.json [--tiles 32] [--replays 3]
"""

from __future__ import annotations

import argparse
import itertools
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import log, run_metadata, write_json
from benchmarks.profile_vit_gemms import IMAGE_SIZE, random_vit, vit_flops

NAME_CHARS = 48


def short_name(name: str) -> str:
    """A kernel's name trimmed to what tells kernels apart (cuBLAS's nvjet tile names included)."""
    name = name.removeprefix("void ")
    return name[:NAME_CHARS]


def kernel_events(run: Callable[[], None]) -> list[tuple[str, float, float]]:
    """(name, start µs, duration µs) of each kernel `run` queues, in start order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    events = []
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:  # kernels, memsets, copies
            interval = event.time_range
            events.append((event.name, float(interval.start), float(interval.elapsed_us())))
    return sorted(events, key=lambda item: item[1])


def gap_report(events: list[tuple[str, float, float]]) -> dict[str, Any]:
    """The span, the summed kernel time, and the gaps between consecutive kernels by pair."""
    if not events:
        return {"kernels": 0}
    span = max(start + duration for _, start, duration in events) - events[0][1]
    busy = sum(duration for _, _, duration in events)
    pairs: dict[str, list[float]] = defaultdict(list)
    gaps = []
    for (before, start, duration), (after, next_start, _) in itertools.pairwise(events):
        gap = next_start - (start + duration)
        gaps.append(gap)
        pairs[f"{short_name(before)} -> {short_name(after)}"].append(gap)
    by_pair = sorted(pairs.items(), key=lambda item: -sum(item[1]))
    return {
        "kernels": len(events),
        "span_ms": span / 1e3,
        "kernel_ms": busy / 1e3,
        "gap_ms": sum(g for g in gaps if g > 0) / 1e3,
        "overlap_ms": -sum(g for g in gaps if g < 0) / 1e3,
        "gaps_us_sorted_tail": sorted(gaps)[-10:],
        "by_pair": [
            {
                "pair": pair,
                "count": len(values),
                "total_us": sum(values),
                "median_us": sorted(values)[len(values) // 2],
            }
            for pair, values in by_pair[:16]
        ],
    }


class ClockSampler:
    """NVML samples (SM clock MHz, power W) every `period_s` in a thread while in the block."""

    def __init__(self, device_index: int, period_s: float = 0.01) -> None:
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        self._period = period_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()

    def _loop(self) -> None:
        nvml = self._nvml
        while not self._stop.is_set():
            clock = nvml.nvmlDeviceGetClockInfo(self._handle, nvml.NVML_CLOCK_SM)
            power = nvml.nvmlDeviceGetPowerUsage(self._handle) / 1e3
            self.samples.append((float(clock), power))
            time.sleep(self._period)

    def __enter__(self) -> ClockSampler:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, Any]:
        # The first quarter is the clock ramping into the load; the rest is its steady state.
        steady = self.samples[len(self.samples) // 4 :]
        clocks = sorted(c for c, _ in steady)
        powers = sorted(p for _, p in steady)
        if not clocks:
            return {"samples": 0}
        return {
            "samples": len(steady),
            "sm_clock_mhz_median": clocks[len(clocks) // 2],
            "sm_clock_mhz_min": clocks[0],
            "power_w_median": powers[len(powers) // 2],
            "power_w_max": powers[-1],
        }


def sustained(run: Callable[[], None], seconds: float, device_index: int) -> dict[str, Any]:
    """`run` back to back for `seconds` with the clock sampled; ms per call from CUDA events."""
    run()
    torch.cuda.synchronize()
    calls = 0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with ClockSampler(device_index) as sampler:
        began = time.monotonic()
        start.record()
        while time.monotonic() - began < seconds:
            for _ in range(4):
                run()
            calls += 4
            torch.cuda.synchronize()
        end.record()
        end.synchronize()
    return {"calls": calls, "ms_per_call": start.elapsed_time(end) / calls, **sampler.summary()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiles", type=int, default=32)
    parser.add_argument("--replays", type=int, default=3)
    parser.add_argument("--sample_s", type=float, default=4.0)
    args = parser.parse_args()
    device = torch.device("cuda")
    index = device.index if device.index is not None else torch.cuda.current_device()
    result: dict[str, Any] = {"meta": run_metadata(device), "tiles": args.tiles}
    model = random_vit()
    generator = torch.Generator(device="cuda").manual_seed(args.tiles)
    pixels = torch.randn(args.tiles, 3, IMAGE_SIZE, IMAGE_SIZE, device="cuda",
                         dtype=torch.bfloat16, generator=generator)  # fmt: skip
    with torch.inference_mode():
        model(pixels)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(pixels)
    result["replays"] = []
    for _ in range(args.replays):
        report = gap_report(kernel_events(graph.replay))
        result["replays"].append(report)
        log(f"{args.tiles} tiles, one graph replay: span {report['span_ms']:.2f} ms, kernels "
            f"{report['kernel_ms']:.2f} ms, gaps {report['gap_ms']:.2f} ms over "
            f"{report['kernels']} kernels")  # fmt: skip
    for row in result["replays"][-1]["by_pair"][:8]:
        log(f"   {row['total_us']:8.1f} µs  x{row['count']:<3} median {row['median_us']:.1f}  "
            f"{row['pair']}")  # fmt: skip
    flops = vit_flops(args.tiles)
    size = 8192
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    out = torch.empty(size, size, device=device, dtype=torch.bfloat16)
    for name, run, work in (
        ("encoder_graph", graph.replay, flops),
        ("matmul_8192", lambda: torch.matmul(a, b, out=out), 2 * size**3),
        ("encoder_graph_again", graph.replay, flops),
    ):
        row = sustained(run, args.sample_s, index)
        row["tflops"] = work / (row["ms_per_call"] / 1e3) / 1e12
        result[name] = row
        log(f"{name}: {row['ms_per_call']:.2f} ms a call, {row['tflops']:.0f} TFLOP/s, SM clock "
            f"median {row.get('sm_clock_mhz_median')} MHz (min {row.get('sm_clock_mhz_min')}), "
            f"power median {row.get('power_w_median')} W")  # fmt: skip
    write_json(args.out, result)


if __name__ == "__main__":
    main()
