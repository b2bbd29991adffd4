"""The ViT's attention (`ocula.kernels.vit_attention`, Triton) alone at several block shapes, with
and without its short tail blocks, and inside the encoder with the short tails on and off.

Alone: InternViT-300M's attention (16 heads of 64, 1025-token tiles) over `--tiles`, q, k, v as
views of one random qkv projection output as in the model; median ms by
`triton.testing.do_bench` (L2 flushed before each call) of a CUDA graph holding one call: the
kernel as the model launches it, `triton_full_tails` (its last query and key blocks at full
size), each query x key block shape of `--triton_blocks`, and with `--peers` torch's SDPA pinned
to its flash, cuDNN and memory-efficient backends. TFLOP/s (4 * tokens^2 * width a
tile) as a fraction of the 8192^3 bf16 matmul measured in the same process; each output against
the default's and, up to 8 tiles, the default's against SDPA in float32.

In the encoder: InternViT-300M with random bf16 weights, eager forwards with the short tails on
and off in turns (`--rounds`), and with `--profile` each kernel's device time in one forward at
the largest tile count, both ways.

    python -m benchmarks.profile_vit_attention --out vit-attention.json [--tiles 1,8,32]
        [--triton_blocks 128x64,128x128] [--peers]
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import log, run_metadata, write_json
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
short_tails_switched = functools.partial(
    constant_switched, "ocula.kernels.vit_attention", "SHORT_TAILS"
)


def attention_inputs(tiles: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = INTERNVIT_300M.hidden
    generator = torch.Generator(device="cuda").manual_seed(tiles)
    qkv = torch.randn(tiles, TOKENS_PER_TILE, 3 * width, device="cuda", generator=generator)
    qkv = qkv.to(torch.bfloat16)
    return tuple(t.unflatten(-1, (-1, HEAD_DIM)) for t in qkv.chunk(3, dim=-1))


def graph_ms(fn) -> float:
    """Device ms of one call of `fn` captured in a CUDA graph (`bench_ms` of its replay): the
    launch's host time stays out."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench_ms(graph.replay)


SDPA_PEERS = ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION")


def sdpa_peers(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, expected: torch.Tensor
) -> tuple[dict[str, float], dict[str, Any]]:
    """torch's SDPA pinned to each backend of `SDPA_PEERS` on the same views (heads moved ahead
    of tokens, no copy): ms of a graph replay and the output against the Triton kernel's. A
    backend that refuses the shape is recorded as unavailable."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    heads_first = [t.transpose(1, 2) for t in (q, k, v)]
    timings: dict[str, float] = {}
    checks: dict[str, Any] = {}
    for name in SDPA_PEERS:
        backend = getattr(SDPBackend, name)

        def call(backend: SDPBackend = backend) -> torch.Tensor:
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(*heads_first, scale=scale)

        try:
            out = call().transpose(1, 2).reshape(expected.shape)
            timings[f"sdpa_{name.lower()}"] = graph_ms(call)
        except RuntimeError as error:
            checks[f"sdpa_{name.lower()}"] = {"unavailable": str(error).splitlines()[0][:200]}
            continue
        checks[f"sdpa_{name.lower()}_vs_triton"] = compare(out, expected)
    return timings, checks


def attention_at(
    tiles: int, blocks: list[tuple[int, int]], peak: float, peers: bool = False
) -> dict[str, Any]:
    from ocula.kernels.vit_attention import vit_attention, vit_attention_reference

    scale = HEAD_DIM**-0.5
    q, k, v = attention_inputs(tiles)
    default = functools.partial(vit_attention, q, k, v, scale)
    expected = default()
    variants = {"triton_full_tails": functools.partial(default, short_tails=False)}
    for block_m, block_n in blocks:
        variants[f"triton_{block_m}x{block_n}"] = functools.partial(default, block_m, block_n)
    timings = {"triton": graph_ms(default)}
    checks: dict[str, Any] = {}
    for name, variant in variants.items():
        checks[f"{name}_vs_triton"] = compare(variant(), expected)
        timings[name] = graph_ms(variant)
    if peers:
        peer_timings, peer_checks = sdpa_peers(q, k, v, scale, expected)
        timings.update(peer_timings)
        checks.update(peer_checks)
    if tiles <= 8:
        reference = vit_attention_reference(q.float(), k.float(), v.float(), scale)
        checks["triton_vs_sdpa_fp32"] = compare(expected, reference.to(q.dtype))
    flops = 4 * tiles * TOKENS_PER_TILE**2 * INTERNVIT_300M.hidden
    row: dict[str, Any] = {"tiles": tiles, "ms": timings, "checks": checks}
    row["fraction_of_peak"] = {key: flops / (ms / 1e3) / peak for key, ms in timings.items()}
    summary = "  ".join(
        f"{key} {ms:.4f} ({row['fraction_of_peak'][key]:.3f})" for key, ms in timings.items()
    )
    log(f"{tiles:>2} tiles  {summary}")
    worst = max(c.get("max_abs_diff", 0.0) for c in checks.values())
    log(f"   largest difference in the checks: {worst:.3g}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiles", default="1,8,32")
    parser.add_argument("--encoder_tiles", default="24,32")
    parser.add_argument("--triton_blocks", default="", help="e.g. 128x64,64x128: more shapes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--peers", action="store_true", help="also time torch SDPA's backends")
    parser.add_argument("--parts", default="alone,encoder")
    args = parser.parse_args()
    device = torch.device("cuda")
    peak = matmul_peak(device, 8192, torch.bfloat16)
    log(f"8192^3 bf16 matmul: {peak['flops_per_s'] / 1e12:.1f} TFLOP/s")
    result: dict[str, Any] = {"meta": run_metadata(device), "matmul_peak": peak}
    parts = args.parts.split(",")
    if "alone" in parts:
        blocks = [tuple(int(n) for n in b.split("x")) for b in args.triton_blocks.split(",") if b]
        result["alone"] = [
            attention_at(int(tiles), blocks, peak["flops_per_s"], args.peers)
            for tiles in args.tiles.split(",")
        ]
        write_json(args.out, result)
    if "encoder" in parts:
        tiles = [int(t) for t in args.encoder_tiles.split(",")]
        result["encoder"] = encoder_ab(
            tiles, args.rounds, peak["flops_per_s"], args.profile, short_tails_switched,
            "vit_short_tails",
        )  # fmt: skip
    write_json(args.out, result)


if __name__ == "__main__":
    main()
