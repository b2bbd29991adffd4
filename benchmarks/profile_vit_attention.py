"""The ViT's attention on the Hopper kernel (`ocula.kernels.vit_attention_hopper`, Gluon) against
the Triton kernel (`ocula.kernels.vit_attention`), alone and inside the encoder. Hopper only.

Alone: InternViT-300M's attention (16 heads of 64, 1025-token tiles) over `--tiles`, q, k, v as
views of one random qkv projection output as in the model; median ms by
`triton.testing.do_bench` (L2 flushed before each call) of a CUDA graph holding one call of:
the Triton kernel (with its short tail blocks and, as `triton_full_tails`, without; at other
query x key block sizes with `--triton_blocks`); the Hopper kernel at each K/V stage count of
`--stages`, its consumers taking turns or not. TFLOP/s (4 * tokens^2 * width a tile) as a
fraction of the 8192^3 bf16 matmul measured in the same process; each output against the
Triton kernel's and, up to 8 tiles, against SDPA in float32. Host time of one launch: the mean
wall time of 200 launches queued without a sync, at one tile.

In the encoder: InternViT-300M with random bf16 weights, eager forwards with the `--ab` switch
on and off in turns (`--rounds`): the Hopper kernel (eager forwards take it from 24 tiles, see
`ocula.models.intern_vit_attention`) or the Triton kernel's short tails; with `--profile` each
kernel's device time in one forward at the largest tile count, both ways.

    python -m benchmarks.profile_vit_attention --out vit-attention.json [--tiles 1,8,32]
        [--stages 2,3 | --stages ''] [--triton_blocks 128x64] [--ab hopper_attention|vit_short_tails]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import KERNEL_SWITCHES, log, run_metadata, write_json
from benchmarks.hardware import matmul_peak
from benchmarks.profile_vit_gemms import (
    TOKENS_PER_TILE,
    bench_ms,
    compare,
    constant_switched,
    encoder_ab,
)
from benchmarks.shapes import INTERNVIT_300M

HEAD_DIM = 64
# The encoder A/B's switch (`--ab`): the Hopper kernel, or the Triton kernel's short tails.
ENCODER_SWITCHES = {
    name: functools.partial(constant_switched, module, constant)
    for name, (module, constant) in KERNEL_SWITCHES.items()
    if name in ("hopper_attention", "vit_short_tails")
}


def attention_inputs(tiles: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = INTERNVIT_300M.hidden
    generator = torch.Generator(device="cuda").manual_seed(tiles)
    qkv = torch.randn(tiles, TOKENS_PER_TILE, 3 * width, device="cuda", generator=generator)
    qkv = qkv.to(torch.bfloat16)
    return tuple(t.unflatten(-1, (-1, HEAD_DIM)) for t in qkv.chunk(3, dim=-1))


def graph_ms(fn) -> float:
    """Device ms of one call of `fn` captured in a CUDA graph (`bench_ms` of its replay): the
    launch's host time, which differs between the kernels, stays out."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench_ms(graph.replay)


def host_launch_ms(fn, launches: int = 200) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(launches):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / launches * 1e3


def attention_alone(
    tiles_list: list[int], stages_list: list[int], triton_blocks: list[tuple[int, int]], peak: float
) -> list[dict]:
    return [attention_at(tiles, stages_list, triton_blocks, peak) for tiles in tiles_list]


def attention_at(
    tiles: int, stages_list: list[int], triton_blocks: list[tuple[int, int]], peak: float
) -> dict[str, Any]:
    from ocula.kernels import vit_attention_hopper as hopper
    from ocula.kernels.vit_attention import vit_attention, vit_attention_reference

    scale = HEAD_DIM**-0.5
    qk_scale = scale * math.log2(math.e)
    q, k, v = attention_inputs(tiles)
    triton_out = vit_attention(q, k, v, scale)
    timings = {"triton": graph_ms(lambda: vit_attention(q, k, v, scale))}
    full_tails = functools.partial(vit_attention, q, k, v, scale, short_tails=False)
    checks: dict[str, Any] = {"triton_full_tails_vs_triton": compare(full_tails(), triton_out)}
    timings["triton_full_tails"] = graph_ms(full_tails)
    for block_m, block_n in triton_blocks:
        blocks = functools.partial(vit_attention, q, k, v, scale, block_m, block_n)
        checks[f"triton_{block_m}x{block_n}_vs_triton"] = compare(blocks(), triton_out)
        timings[f"triton_{block_m}x{block_n}"] = graph_ms(blocks)
    reference = None
    if tiles <= 8:
        reference = vit_attention_reference(q.float(), k.float(), v.float(), scale)
        reference = reference.to(q.dtype)  # SDPA in float32, rounded once
        checks["triton_vs_sdpa_fp32"] = compare(triton_out, reference)
    for stages, turns in itertools.product(stages_list, (True, False) if stages_list else ()):
        name = f"hopper_s{stages}" + ("" if turns else "_no_turns")
        hopper_call = functools.partial(
            hopper.hopper_vit_attention, q, k, v, qk_scale, stages, turns
        )
        out = hopper_call()
        checks[f"{name}_vs_triton"] = compare(out, triton_out)
        if reference is not None:
            checks[f"{name}_vs_sdpa_fp32"] = compare(out, reference)
        timings[name] = graph_ms(hopper_call)
    flops = 4 * tiles * TOKENS_PER_TILE**2 * INTERNVIT_300M.hidden
    row: dict[str, Any] = {"tiles": tiles, "ms": timings, "checks": checks}
    row["fraction_of_peak"] = {key: flops / (ms / 1e3) / peak for key, ms in timings.items()}
    if tiles == 1:
        row["host_launch_ms"] = {"triton": host_launch_ms(lambda: vit_attention(q, k, v, scale))}
        if stages_list:
            hopper_launch = functools.partial(hopper.hopper_vit_attention, q, k, v, qk_scale)
            row["host_launch_ms"]["hopper"] = host_launch_ms(hopper_launch)
        log(f"host ms a launch: {row['host_launch_ms']}")
    summary = "  ".join(
        f"{key} {ms:.4f} ({row['fraction_of_peak'][key]:.3f})" for key, ms in timings.items()
    )
    log(f"{tiles:>2} tiles  {summary}")
    worst = max(c["max_abs_diff"] for c in checks.values())
    log(f"   largest difference in the checks: {worst:.3g}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiles", default="1,8,32")
    parser.add_argument("--encoder_tiles", default="24,32")
    parser.add_argument("--stages", default="2,3,4", help="the Hopper kernel's; '' for none")
    parser.add_argument("--triton_blocks", default="", help="e.g. 128x64,64x128: more shapes")
    parser.add_argument("--ab", default="hopper_attention", choices=sorted(ENCODER_SWITCHES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--parts", default="alone,encoder")
    args = parser.parse_args()
    device = torch.device("cuda")
    peak = matmul_peak(device, 8192, torch.bfloat16)
    log(f"8192^3 bf16 matmul: {peak['flops_per_s'] / 1e12:.1f} TFLOP/s")
    result: dict[str, Any] = {"meta": run_metadata(device), "matmul_peak": peak}
    parts = args.parts.split(",")
    if "alone" in parts:
        tiles = [int(t) for t in args.tiles.split(",")]
        stages = [int(s) for s in args.stages.split(",") if s]
        blocks = [tuple(int(n) for n in b.split("x")) for b in args.triton_blocks.split(",") if b]
        result["alone"] = attention_alone(tiles, stages, blocks, peak["flops_per_s"])
        write_json(args.out, result)
    if "encoder" in parts:
        tiles = [int(t) for t in args.encoder_tiles.split(",")]
        result["encoder"] = encoder_ab(
            tiles, args.rounds, peak["flops_per_s"], args.profile, ENCODER_SWITCHES[args.ab],
            args.ab,
        )  # fmt: skip
    write_json(args.out, result)


if __name__ == "__main__":
    main()
