"""The ViT's projections on the ping-pong GEMM (`ocula.kernels.pingpong_linear`) against cuBLAS,
alone and inside the encoder (where only fc1 and its GELU take it). Hopper GPUs only.

Alone: InternViT-300M's qkv, proj, fc1 and fc2 over 1 / 8 / 32 tiles of 1025 tokens; median ms by
`triton.testing.do_bench` (L2 flushed before each call) of `F.linear` (cuBLAS), of fc1 followed by
the GELU lookup table (the engine's path without the kernel), and of the kernel at each stage
count of `--stages`, fc1 with the table in its epilogue; TFLOP/s as a fraction of the 8192^3 bf16
matmul measured in the same process. Each kernel result is compared with cuBLAS's (largest
difference, share of bit-identical outputs).

In the encoder: InternViT-300M with random bf16 weights (24 layers), eager forwards at the same
tile counts with the kernel on and off in turns (`--rounds`), median of 10 each; MFU counts the
layers' matmuls, attention and the patch embedding. Outputs on against off: largest difference.
`--profile` adds each kernel's device time in one 32-tile forward, both ways.

    python -m benchmarks.profile_vit_gemms --out vit-gemms.json [--rounds 3] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import log, run_metadata, time_call, write_json
from benchmarks.hardware import matmul_peak
from benchmarks.random_weights import random_tensor
from benchmarks.shapes import INTERNVIT_300M

TOKENS_PER_TILE = 1025  # a 448-px tile: 32 x 32 patches of 14 px and the class token
IMAGE_SIZE, PATCH = 448, 14


def bench_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def compare(got: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    diff = (got.float() - reference.float()).abs()
    return {
        "max_abs_diff": diff.max().item(),
        "max_abs_reference": reference.float().abs().max().item(),
        "bit_identical_share": (got.view(torch.int16) == reference.view(torch.int16))
        .float()
        .mean()
        .item(),
    }


def projections_alone(tiles_list: list[int], stages_list: list[int], peak: float) -> list[dict]:
    width, mlp = INTERNVIT_300M.hidden, INTERNVIT_300M.intermediate
    shapes = {"qkv": (3 * width, width), "proj": (width, width), "fc1": (mlp, width),
              "fc2": (width, mlp)}  # fmt: skip
    generator = torch.Generator(device="cuda").manual_seed(0)
    rows_out = []
    for tiles in tiles_list:
        rows = tiles * TOKENS_PER_TILE
        for name, (features, depth) in shapes.items():
            x = torch.randn(rows, depth, device="cuda", dtype=torch.bfloat16, generator=generator)
            weight = torch.randn(features, depth, device="cuda", generator=generator) / depth**0.5
            bias = torch.randn(features, device="cuda", generator=generator).to(torch.bfloat16)
            row = one_projection(x, weight.to(torch.bfloat16), bias, name == "fc1", stages_list)
            flops = 2 * rows * features * depth
            row.update(tiles=tiles, projection=name, rows=rows, features=features, depth=depth)
            row["fraction_of_peak"] = {k: flops / (ms / 1e3) / peak for k, ms in row["ms"].items()}
            timings = "  ".join(f"{k} {v:.4f}" for k, v in row["ms"].items())
            log(f"{tiles:>2} tiles {name:<4} {timings}")
            rows_out.append(row)
    return rows_out


def one_projection(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gelu: bool, stages_list: list[int]
) -> dict[str, Any]:
    """Times of one projection's paths; with `gelu`, fc1 then exact GELU: cuBLAS and the table
    pass (the engine without the kernel) against the kernel with the table in its epilogue."""
    from ocula.kernels import pingpong_linear as kernel
    from ocula.kernels.table_activation import activation_table, table_activation_

    timings = {"cublas": bench_ms(lambda: F.linear(x, weight, bias))}
    reference = F.linear(x, weight, bias)
    table = None
    if gelu:
        timings["cublas_then_gelu_table"] = bench_ms(
            lambda: table_activation_(F.linear(x, weight, bias), F.gelu)
        )
        reference = F.gelu(reference)
        table = activation_table(F.gelu, x.dtype, x.device)
    checks = {}
    default_stages = kernel.STAGES
    try:
        for stages in stages_list:
            kernel.STAGES = stages
            name = f"pingpong_s{stages}" + ("_table" if gelu else "")
            got = kernel.pingpong_linear(x, weight, bias, activation_table=table)
            checks[name] = compare(got, reference)
            timings[name] = bench_ms(
                lambda: kernel.pingpong_linear(x, weight, bias, activation_table=table)
            )
        if gelu:  # the kernel's GEMM alone, for the epilogue's cost
            timings["pingpong_no_activation"] = bench_ms(
                lambda: kernel.pingpong_linear(x, weight, bias)
            )
    finally:
        kernel.STAGES = default_stages
    return {"gelu": gelu, "ms": timings, "against_cublas": checks}


def random_vit() -> torch.nn.Module:
    from ocula.distributed.parallel_group import SINGLE_RANK
    from ocula.models.intern_vit import InternViT
    from ocula.models.internvl_config import InternViTConfig

    shape = INTERNVIT_300M
    config = InternViTConfig(
        hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        image_size=IMAGE_SIZE, patch_size=PATCH, qkv_bias=True,
    )  # fmt: skip
    model = InternViT(config, select_layer=-1, tp=SINGLE_RANK)
    model = model.to(device="cuda", dtype=torch.bfloat16).eval()
    with torch.no_grad():  # the benchmark checkpoints' values (`benchmarks.random_weights`)
        for name, param in model.named_parameters():
            param.copy_(random_tensor(name, tuple(param.shape), param.device, seed=0))
    return model


def vit_flops(tiles: int) -> float:
    n, width, mlp = TOKENS_PER_TILE, INTERNVIT_300M.hidden, INTERNVIT_300M.intermediate
    per_layer = 2 * n * (4 * width * width + 2 * width * mlp) + 4 * n * n * width
    patch_embed = 2 * (n - 1) * 3 * PATCH * PATCH * width
    return tiles * (INTERNVIT_300M.layers * per_layer + patch_embed)


def kernel_times(forward) -> dict[str, float]:
    """Device ms per kernel name in one call of `forward`, largest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        forward()
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        totals[event.key[:90]] += getattr(event, "device_time_total", 0) / 1e3
    return dict(sorted(totals.items(), key=lambda item: -item[1])[:14])


def encoder_ab(
    tiles_list: list[int], rounds: int, peak: float, profile: bool, switch=None,
    label: str = "pingpong",
) -> dict[str, Any]:  # fmt: skip
    """A random-weight InternViT-300M at each tile count with `switch(True)` and `switch(False)`
    in turns (`encoder_rounds`; the ping-pong GEMM's switch by default), and with `profile` each
    kernel's device time in one forward at the largest count, both ways."""
    switch = switch or pingpong_switched
    model = random_vit()
    results: dict[str, Any] = {"rows": [], "profile": {}}
    for tiles in tiles_list:
        generator = torch.Generator(device="cuda").manual_seed(tiles)
        pixels = torch.randn(tiles, 3, IMAGE_SIZE, IMAGE_SIZE, device="cuda",
                             dtype=torch.bfloat16, generator=generator)  # fmt: skip
        with torch.inference_mode():
            results["rows"] += encoder_rounds(model, pixels, rounds, peak, switch, label)
            if profile and tiles == max(tiles_list):
                for use in (True, False):
                    with switch(use):
                        forward = functools.partial(model, pixels)
                        results["profile"][f"{label}={use}"] = kernel_times(forward)
    return results


@contextlib.contextmanager
def constant_switched(module_name: str, attribute: str, use: bool):
    """Sets a kernel switch (a module constant the model reads per call) inside the block."""
    import importlib

    module = importlib.import_module(module_name)
    before = getattr(module, attribute)
    setattr(module, attribute, use)
    try:
        yield
    finally:
        setattr(module, attribute, before)


pingpong_switched = functools.partial(
    constant_switched, "ocula.models.intern_vit_linear", "USE_PINGPONG"
)


def encoder_rounds(
    model, pixels: torch.Tensor, rounds: int, peak: float, switch=pingpong_switched,
    label: str = "pingpong",
) -> list[dict]:  # fmt: skip
    """Eager forwards with `switch(True)` and `switch(False)` in turns: median ms of 10 each."""
    tiles = pixels.shape[0]
    outputs = {}
    for use in (False, True):
        with switch(use):
            outputs[use] = model(pixels)
    check = compare(outputs[True], outputs[False])
    rows = []
    for round_index in range(rounds):
        for use in (True, False):
            with switch(use):
                times = time_call(functools.partial(model, pixels), torch.device("cuda"), 3, 10)
            median = sorted(times)[len(times) // 2]
            rows.append({"tiles": tiles, label: use, "round": round_index,
                         "median_ms": median, "best_ms": min(times),
                         "mfu": vit_flops(tiles) / (median / 1e3) / peak, "on_vs_off": check})  # fmt: skip
            log(f"encoder {tiles:>2} tiles {label}={use}: {median:.2f} ms, "
                f"MFU {rows[-1]['mfu']:.3f} (max diff on/off {check['max_abs_diff']:.3g})")  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiles", default="1,8,32")
    parser.add_argument("--stages", default="4,5")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--parts", default="alone,encoder")
    args = parser.parse_args()
    device = torch.device("cuda")
    tiles_list = [int(t) for t in args.tiles.split(",")]
    peak = matmul_peak(device, 8192, torch.bfloat16)
    log(f"8192^3 bf16 matmul: {peak['flops_per_s'] / 1e12:.1f} TFLOP/s")
    result: dict[str, Any] = {"meta": run_metadata(device), "matmul_peak": peak}
    parts = args.parts.split(",")
    if "alone" in parts:
        stages = [int(s) for s in args.stages.split(",")]
        result["alone"] = projections_alone(tiles_list, stages, peak["flops_per_s"])
        write_json(args.out, result)
    if "encoder" in parts:
        result["encoder"] = encoder_ab(tiles_list, args.rounds, peak["flops_per_s"], args.profile)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
