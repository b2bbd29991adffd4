"""The device's own limits, measured in the same run as the engine: copy bandwidth and matmul peak.

- Bandwidth: `dst.copy_(src)` of one large buffer (4 GiB on a GPU) on the device, best of N
  after warm-up, timed with CUDA events. It counts the bytes read plus the bytes written
  (2 x buffer size) per copy, the usual convention for "achievable HBM bandwidth".
- Matmul peak: an 8192 x 8192 x 8192 bf16 matmul of random normal inputs, best of N, at
  2 * 8192^3 FLOPs per product. Beside it, the same matmul's sustained rate: the median over
  the second half of `SUSTAIN_S` seconds of back-to-back products, when the GPU's power limit
  has brought its clock down (an H100 at 700 W: ~1,400 MHz against the boost clock at which
  the best of N is often caught).

The ratios of the other scripts divide by these two numbers. `--tiny` measures a small copy and an
fp32 matmul on the CPU, only to exercise the code.

    python -m benchmarks.hardware --out /tmp/hardware.json
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    device_name,
    log,
    percentile,
    pick_device,
    run_metadata,
    sync,
    time_call,
    write_json,
)

GPU_COPY_BYTES = 4 << 30
GPU_MATMUL_SIZE = 8192
REPS = 20
SUSTAIN_S = 3.0


def time_sustained(fn: Callable[[], Any], device: torch.device, seconds: float) -> list[float]:
    """Milliseconds of each call of `fn` in the second half of `seconds` of back-to-back calls.
    A GPU at its power limit lowers its clock within tens of milliseconds of a heavy load, so
    a best-of-a-few time (`time_call`) can catch it at a boost clock that a longer load does
    not keep; this is the steady state under the cap. CUDA events on a GPU, wall clock
    elsewhere; at least one call."""
    fn()
    sync(device)
    timed: list[tuple[float, Any]] = []
    began = time.monotonic()
    while not timed or time.monotonic() - began < seconds:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            timed.append((time.monotonic() - began, (start, end)))
            if len(timed) % 8 == 0:  # keep the queue short, so elapsed time tracks the device's
                end.synchronize()
        else:
            t0 = time.perf_counter()
            fn()
            timed.append((time.monotonic() - began, (time.perf_counter() - t0) * 1e3))
    sync(device)
    half = [value for at, value in timed if at >= seconds / 2] or [timed[-1][1]]
    if device.type == "cuda":
        return [start.elapsed_time(end) for start, end in half]
    return half


def copy_bandwidth(device: torch.device, num_bytes: int, reps: int = REPS) -> dict[str, Any]:
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    times = time_call(lambda: dst.copy_(src), device, warmup=3, reps=reps)
    best = min(times)
    moved = 2 * num_bytes  # read src + write dst
    return {
        "buffer_bytes": num_bytes,
        "bytes_counted_per_copy": moved,
        "best_ms": best,
        "median_ms": percentile(times, 50),
        "bytes_per_s": moved / (best / 1e3),
        "counting": "bytes read + bytes written (2 x buffer) per device-to-device copy, best of "
        f"{reps}",
    }


def matmul_peak(
    device: torch.device, size: int, dtype: torch.dtype, reps: int = REPS, sustain_s: float = 0.0
) -> dict[str, Any]:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)

    def product() -> None:
        torch.matmul(a, b, out=out)

    times = time_call(product, device, warmup=5, reps=reps)
    best = min(times)
    flops = 2 * size**3
    result = {
        "shape": [size, size, size],
        "dtype": str(dtype).removeprefix("torch."),
        "best_ms": best,
        "median_ms": percentile(times, 50),
        "flops_per_s": flops / (best / 1e3),
        "counting": f"2 * {size}^3 FLOPs per product, random normal inputs, best of {reps}",
    }
    if sustain_s > 0:
        sustained = percentile(time_sustained(product, device, sustain_s), 50)
        result["sustained_ms"] = sustained
        result["sustained_flops_per_s"] = flops / (sustained / 1e3)
        result["sustained_counting"] = (
            f"median over the second half of {sustain_s:g} s of back-to-back products"
        )
    return result


def measure(device: torch.device, tiny: bool) -> dict[str, Any]:
    """Both limits on `device`; small sizes (and fp32 on a CPU) when `tiny`."""
    if tiny or device.type != "cuda":
        copy = copy_bandwidth(device, 64 << 20, reps=5)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        matmul = matmul_peak(device, 512, dtype, reps=5, sustain_s=0.2)
    else:
        copy = copy_bandwidth(device, GPU_COPY_BYTES)
        matmul = matmul_peak(device, GPU_MATMUL_SIZE, torch.bfloat16, sustain_s=SUSTAIN_S)
        torch.cuda.empty_cache()
    result: dict[str, Any] = {"device": device_name(device), "copy": copy, "matmul": matmul}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        result["multiprocessors"] = props.multi_processor_count
        result["memory_bytes"] = props.total_memory
    log(
        f"hardware: copy {copy['bytes_per_s'] / 1e9:,.0f} GB/s (read+write), "
        f"matmul {matmul['flops_per_s'] / 1e12:,.1f} TFLOP/s ({matmul['dtype']}; sustained "
        f"{matmul['sustained_flops_per_s'] / 1e12:,.1f})"
    )
    return result


def bandwidth_of(hardware: dict[str, Any]) -> float:
    return float(hardware["copy"]["bytes_per_s"])


def matmul_flops_of(hardware: dict[str, Any]) -> float:
    return float(hardware["matmul"]["flops_per_s"])


def sustained_matmul_flops_of(hardware: dict[str, Any]) -> float | None:
    """The matmul's rate under the power limit; None in results written before it was kept."""
    value = hardware["matmul"].get("sustained_flops_per_s")
    return None if value is None else float(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = pick_device()
    result = measure(device, args.tiny)
    result["meta"] = run_metadata(device)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
