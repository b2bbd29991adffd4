"""The ViT gap profile's arithmetic (benchmarks/profile_vit_gaps.gap_report) and the sustained
timing helper the matmul's sustained rate comes from (benchmarks/hardware.time_sustained)."""

from __future__ import annotations

import torch

from benchmarks.hardware import time_sustained
from benchmarks.profile_vit_gaps import gap_report


def test_span_busy_time_gaps_and_overlaps_by_kernel_pair() -> None:
    # (name, start µs, duration µs): a 2 µs gap and a 3 µs gap between "ln" and "gemm", and
    # "attn" starting 1 µs before "gemm" ends (an overlap, not a gap).
    events = [("ln", 0.0, 10.0), ("gemm", 12.0, 5.0), ("attn", 16.0, 4.0), ("ln", 20.0, 2.0),
              ("gemm", 25.0, 1.0)]  # fmt: skip
    report = gap_report(events)
    assert report["kernels"] == 5
    assert report["span_ms"] == 26.0 / 1e3
    assert report["kernel_ms"] == 22.0 / 1e3
    assert report["gap_ms"] == 5.0 / 1e3
    assert report["overlap_ms"] == 1.0 / 1e3
    first = report["by_pair"][0]
    assert (first["pair"], first["count"], first["total_us"]) == ("ln -> gemm", 2, 5.0)
    assert gap_report([]) == {"kernels": 0}


def test_sustained_timing_keeps_the_second_half_and_at_least_one_call() -> None:
    calls = []
    times = time_sustained(lambda: calls.append(1), torch.device("cpu"), 0.05)
    assert times and all(t >= 0 for t in times)
    assert len(times) < len(calls)  # the first half (and the warm-up call) is left out
    assert len(time_sustained(lambda: None, torch.device("cpu"), 0.0)) == 1
