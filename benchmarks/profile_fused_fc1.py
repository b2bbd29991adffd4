"""The ViT's fc1 + exact GELU as one kernel (`linear_table_activation`) against cuBLAS + the table.

Two parts, one run, on the GPU:
- the kernel alone at InternViT-300M's fc1 shape (1,025 x tiles rows, 1024 -> 4096, bf16): for
  each config the fused time, its GEMM alone (`activate=False`), the fraction of outputs
  bit-identical to `table_activation_(F.linear(...))`, and cuBLAS fc1 with and without the
  table beside it (`triton.testing.do_bench`, L2 flushed, medians);
- an InternViT-300M encoder (24 layers, random weights) with `intern_vit.USE_FUSED_FC1` on and
  off in turn: milliseconds per forward (medians of 10) in three rounds, whether the outputs are
  bit-identical, and the layers' MFU against an 8192^3 bf16 matmul timed in the same run.

    python -m benchmarks.profile_fused_fc1 --out fused.json [--tiles 8,16,32]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import log, percentile, run_metadata, time_call, write_json
from benchmarks.hardware import matmul_peak
from ocula.distributed.parallel_group import SINGLE_RANK
from ocula.kernels.linear_table_activation import (
    DEFAULT_CONFIG,
    fused_applies,
    linear_table_activation,
)
from ocula.kernels.table_activation import table_activation_
from ocula.models import intern_vit
from ocula.models.internvl_config import InternViTConfig

WIDTH, MLP, LAYERS, TOKENS = 1024, 4096, 24, 1025  # InternViT-300M at 448 px
CONFIGS = [DEFAULT_CONFIG, (128, 256, 64, 4, 8), (256, 128, 64, 3, 8)]


def kernel_rows(tiles: int, device: torch.device) -> list[dict[str, Any]]:
    from triton.testing import do_bench

    generator = torch.Generator(device=device).manual_seed(tiles)

    def normal(*shape: int, scale: float = 1.0) -> torch.Tensor:
        values = torch.randn(*shape, device=device, generator=generator) * scale
        return values.to(torch.bfloat16)

    x, weight, bias = normal(TOKENS * tiles, WIDTH), normal(MLP, WIDTH, scale=0.03), normal(MLP)
    expected = table_activation_(F.linear(x, weight, bias), F.gelu).view(torch.int16)
    rows: list[dict[str, Any]] = [
        {
            "tiles": tiles,
            "fused_applies": fused_applies(x, weight, MLP),
            "cublas_fc1_ms": do_bench(lambda: F.linear(x, weight, bias), rep=200),
            "cublas_fc1_and_table_ms": do_bench(
                lambda: table_activation_(F.linear(x, weight, bias), F.gelu), rep=200
            ),
        }
    ]
    for config in CONFIGS:
        row: dict[str, Any] = {"tiles": tiles, "config": list(config)}
        try:
            got = linear_table_activation(x, weight, bias, F.gelu, config).view(torch.int16)
            row["bit_identical_fraction"] = (got == expected).float().mean().item()
            row["fused_ms"] = do_bench(
                lambda c=config: linear_table_activation(x, weight, bias, F.gelu, c), rep=200
            )
            row["gemm_only_ms"] = do_bench(
                lambda c=config: linear_table_activation(x, weight, bias, F.gelu, c, None, False),
                rep=200,
            )
        except Exception as error:  # a config that does not compile or launch here
            row["error"] = repr(error)[:300]
        rows.append(row)
    for row in rows:
        log(str(row))
    return rows


def random_encoder(device: torch.device) -> intern_vit.InternViT:
    config = InternViTConfig(
        hidden_size=WIDTH,
        intermediate_size=MLP,
        num_hidden_layers=LAYERS,
        num_attention_heads=16,
        image_size=448,
        patch_size=14,
        qkv_bias=True,
    )
    torch.manual_seed(0)
    encoder = intern_vit.InternViT(config, -1, SINGLE_RANK)
    with torch.no_grad():
        for name, parameter in encoder.named_parameters():
            if name.endswith(("ls1", "ls2")):
                parameter.fill_(0.1)
            elif "norm" in name:
                parameter.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                parameter.normal_(0, 0.02)
    intern_vit.warm_up_table_activations("gelu", torch.bfloat16, device)
    return encoder.to(device, torch.bfloat16).eval()


def encoder_rows(
    encoder: intern_vit.InternViT, tiles: int, peak: float, device: torch.device
) -> list[dict[str, Any]]:
    generator = torch.Generator(device=device).manual_seed(tiles)
    pixels = torch.randn(tiles, 3, 448, 448, device=device, generator=generator)
    pixels = pixels.to(torch.bfloat16)
    flops = tiles * LAYERS * (2 * TOKENS * (4 * WIDTH**2 + 2 * WIDTH * MLP) + 4 * TOKENS**2 * WIDTH)
    outputs = {}
    rows = []
    with torch.inference_mode():
        for fused in (True, False):
            intern_vit.USE_FUSED_FC1 = fused
            outputs[fused] = encoder(pixels).view(torch.int16)
        identical = torch.equal(outputs[True], outputs[False])
        for round_index in range(3):
            for fused in (True, False):
                intern_vit.USE_FUSED_FC1 = fused
                times = time_call(lambda: encoder(pixels), device, warmup=3, reps=10)
                median = percentile(times, 50)
                rows.append(
                    {
                        "tiles": tiles,
                        "fused": fused,
                        "round": round_index,
                        "median_ms": median,
                        "best_ms": min(times),
                        "layers_mfu": flops / (median / 1e3) / peak,
                        "outputs_bit_identical": identical,
                    }
                )
                log(str(rows[-1]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiles", default="8,16,32", help="comma-separated tile counts")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark runs on a CUDA GPU with TMA (Hopper or later)")
    device = torch.device("cuda")
    tile_counts = [int(t) for t in args.tiles.split(",")]
    peak = matmul_peak(device, 8192, torch.bfloat16)
    results: dict[str, Any] = {"run": run_metadata(device), "matmul_peak": peak}
    results["kernel"] = [row for tiles in tile_counts for row in kernel_rows(tiles, device)]
    write_json(args.out, results)
    encoder = random_encoder(device)
    previous = intern_vit.USE_FUSED_FC1
    try:
        results["encoder"] = [
            row
            for tiles in tile_counts
            for row in encoder_rows(encoder, tiles, peak["flops_per_s"], device)
        ]
    finally:
        intern_vit.USE_FUSED_FC1 = previous
    write_json(args.out, results)


if __name__ == "__main__":
    main()
