"""Batch-1 decode projections: the GEMV kernel against cuBLAS, and its tile shapes swept.

For each projection of Qwen2.5-7B or InternLM2.5-7B (qkv, with its bias in Qwen2, o, gate_up,
down, and the LM head) with
one row of x, and for comparison cuBLAS at 2 and 8 rows: microseconds per product with cuBLAS
(`F.linear`), with `ocula.kernels.gemv` at its default tile shape, and at every shape of a
sweep. Each timing is one CUDA graph of a product per copy of the weight, the copies together
larger than the L2 cache (successive layers' weights are not in L2 either), divided by the
copies. The
bandwidth ratio is the weight bytes per microsecond over the device-to-device copy bandwidth
measured in the same run (read-only streams can exceed it slightly). Also checks every result
against cuBLAS's (the largest difference, relative to the largest output).

    python -m benchmarks.profile_gemv --out gemv.json [--model internvl2_5-8b] [--tiny]
    (on CPU: TRITON_INTERPRET=1)
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import graph_us, log, pick_device, run_metadata, write_json
from benchmarks.hardware import copy_bandwidth
from benchmarks.shapes import INTERNLM25_7B, QWEN25_7B, TINY_TEXT, TextShape
from ocula.kernels.gemv import gemv, gemv_config

CUBLAS_ROWS = (2, 8)  # cuBLAS only: its time with more rows, for comparison
WEIGHT_BYTES_PER_CASE = 1 << 30  # copies of a weight per timing: at least this many bytes
# (BLOCK_N, BLOCK_K, num_warps), leaving out tiles of more than 128 elements per thread, which
# spill registers.
SWEEP = [
    (block_n, block_k, warps)
    for block_n, block_k, warps in itertools.product((2, 4, 8, 16), (256, 512, 1024), (2, 4, 8))
    if block_n * block_k <= 128 * 32 * warps
]
# model -> (language model shape, whether its qkv projection has a bias)
MODELS = {"internvl3-8b": (QWEN25_7B, True), "internvl2_5-8b": (INTERNLM25_7B, False)}
VOCAB = 151_680  # Qwen2's 151,674 ids padded to a multiple of 64, as the engine pads them


def projections(
    shape: TextShape, vocab: int, qkv_bias: bool = True
) -> dict[str, tuple[int, int, bool]]:
    """name -> (features, depth, has bias) of one layer's projections and the LM head."""
    head_dim = shape.hidden // shape.heads
    qkv = (shape.heads + 2 * shape.kv_heads) * head_dim
    return {
        "qkv": (qkv, shape.hidden, qkv_bias),
        "o": (shape.hidden, shape.hidden, False),
        "gate_up": (2 * shape.intermediate, shape.hidden, False),
        "down": (shape.hidden, shape.intermediate, False),
        "lm_head": (vocab, shape.hidden, False),
    }


def case(
    features: int,
    depth: int,
    has_bias: bool,
    bandwidth: float,
    device: torch.device,
    sweep: bool,
) -> dict[str, Any]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    weight_bytes = features * depth * dtype.itemsize
    copies = max(2, -(-WEIGHT_BYTES_PER_CASE // weight_bytes)) if device.type == "cuda" else 1
    generator = torch.Generator(device=device).manual_seed(features + depth)
    weights = [
        torch.randn(features, depth, device=device, dtype=dtype, generator=generator) * 0.02
        for _ in range(copies)
    ]
    bias = torch.randn(features, device=device, dtype=dtype) if has_bias else None
    rows = torch.randn(max(CUBLAS_ROWS), depth, device=device, dtype=dtype)
    x = rows[:1]
    reference = F.linear(x, weights[0], bias).float()

    def timed(fn: Any) -> float:
        return graph_us([lambda w=w: fn(w) for w in weights], device)

    def ratio(us: float) -> float:
        return weight_bytes / (us * 1e-6) / bandwidth

    difference = (gemv(x, weights[0], bias).float() - reference).abs().max()
    result: dict[str, Any] = {
        "features": features,
        "depth": depth,
        "cublas_us": timed(lambda w: F.linear(x, w, bias)),
        "gemv_default_config": gemv_config(features, depth),
        "gemv_us": timed(lambda w: gemv(x, w, bias)),
        "max_difference_vs_cublas": (difference / reference.abs().max()).item(),
    }
    for count in CUBLAS_ROWS:
        result[f"cublas_{count}_rows_us"] = timed(lambda w, c=count: F.linear(rows[:c], w, bias))
    result["cublas_bandwidth_ratio"] = ratio(result["cublas_us"])
    result["gemv_bandwidth_ratio"] = ratio(result["gemv_us"])
    if sweep:
        swept = {}
        for config in SWEEP:
            label = "x".join(map(str, config))
            swept[label] = timed(lambda w, c=config: gemv(x, w, bias, config=c))
        best = min(swept, key=swept.__getitem__)
        result["sweep_us"] = swept
        result["best_config"], result["best_us"] = best, swept[best]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", choices=sorted(MODELS), default="internvl3-8b")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (exercises the code)")
    parser.add_argument("--no_sweep", action="store_true", help="default tile shapes only")
    args = parser.parse_args()
    device = pick_device()
    bandwidth = copy_bandwidth(device, (4 << 30) if device.type == "cuda" else 1 << 20)
    shape, qkv_bias = MODELS[args.model]
    shape, vocab = (TINY_TEXT, 256) if args.tiny else (shape, VOCAB)
    results: dict[str, Any] = {
        "meta": run_metadata(device),
        "model": args.model,
        "copy_bandwidth": bandwidth,
    }
    for name, (features, depth, has_bias) in projections(shape, vocab, qkv_bias).items():
        sweep = not args.no_sweep and name != "lm_head"
        row = case(features, depth, has_bias, bandwidth["bytes_per_s"], device, sweep)
        results[name] = row
        write_json(args.out, results)  # after each projection: a cut-short run keeps the rest
        log(
            f"{name}: cuBLAS {row['cublas_us']:.1f} us ({row['cublas_bandwidth_ratio']:.2f}; "
            f"2 rows {row['cublas_2_rows_us']:.1f}, 8 rows {row['cublas_8_rows_us']:.1f}), "
            f"gemv {row['gemv_us']:.1f} us ({row['gemv_bandwidth_ratio']:.2f}), best "
            f"{row.get('best_config')} {row.get('best_us', float('nan')):.1f} us; "
            f"difference {row['max_difference_vs_cublas']:.1e}"
        )


if __name__ == "__main__":
    main()
