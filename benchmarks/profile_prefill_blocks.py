"""The prefill attention's block sizes for chunks over a cached prefix, timed as the model runs.

For each case (new queries, the whole-step graph's bucket that fixes `max_query_len`, the
sequence's keys: its cached prefix and the new tokens) and each (BLOCK_M, BLOCK_N),
`prefill_attention` runs once per layer of Qwen2.5-7B (28 query heads over 4 KV heads of 128,
bf16), each layer with its own K/V cache, all in one CUDA graph, with a memset of `--flush_mb`
before each call as the weights' read between two layers evicts the L2 cache in the model; the
memsets' own graph is timed too and subtracted. Reported:
microseconds per call (median of `--reps` replays), and the largest difference from the launch's
own configuration (`_launch_config`, measured first and again in the sweep when it is one of
the swept pairs). Timing one call with `triton.testing.do_bench` read 18-92 us for one and the
same configuration on an H100: too noisy for kernels of ~15 us.

    python -m benchmarks.profile_prefill_blocks --out blocks.json
    TRITON_INTERPRET=1 python -m benchmarks.profile_prefill_blocks --tiny --out /tmp/blocks.json
    (the CPU runs each configuration once through the interpreter: a check, not a timing)
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import graph_us, log, pick_device, run_metadata, write_json
from benchmarks.shapes import QWEN25_7B, TINY_TEXT, TextShape
from ocula.kernels.prefill_attention import _launch_config, padded_head_dim, prefill_attention
from ocula.utils.triton_interpreter import runtime_loop_bounds

# (new queries, graph bucket, keys including the new ones): a question after an image (~390
# keys), longer chat histories, a short follow-up, a ~120-token chunk, then chunks of 129-511
# tokens (which keep 64 x 64 blocks) over no prefix (a 330-token image prompt), a short one and
# long ones.
CASES = [
    (60, 64, 390),
    (60, 64, 1100),
    (60, 64, 8000),
    (30, 32, 2000),
    (16, 16, 400),
    (120, 128, 500),
    (120, 128, 120),
    (250, 256, 4000),
    (330, 352, 330),
    (200, 224, 1200),
    (200, 224, 8000),
    (480, 480, 480),
    (480, 480, 4000),
]
TINY_CASES = [(12, 16, 40), (20, 32, 20)]
BLOCKS = [(16, 64), (16, 128), (32, 64), (32, 128), (64, 64), (64, 128)]


class Case:
    """One case's tensors: q, one K/V cache per layer, a shuffled slot table of one sequence."""

    def __init__(
        self, shape: TextShape, layers: int, queries: int, context: int, device: torch.device
    ) -> None:
        generator = torch.Generator().manual_seed(queries * 100_003 + context)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
        head_dim = shape.hidden // shape.heads
        slots = context + 1  # slot 0 is the scratch slot, never read
        kv_shape = (slots, shape.kv_heads, head_dim)

        def draw(*size: int) -> torch.Tensor:
            return torch.randn(*size, generator=generator).to(device, dtype)

        self.caches = [(draw(*kv_shape), draw(*kv_shape)) for _ in range(layers)]
        self.q = draw(queries, shape.heads, head_dim)
        order = torch.randperm(context, generator=generator) + 1
        self.table = order.to(device=device, dtype=torch.int32)[None, :]
        self.rows = torch.zeros(1, dtype=torch.int64, device=device)
        self.starts = torch.tensor([0, queries], dtype=torch.int32, device=device)
        self.lens = torch.tensor([context], dtype=torch.int32, device=device)
        self.out = torch.zeros(layers, *self.q.shape, dtype=dtype, device=device)
        self.scale = head_dim**-0.5

    def layer_calls(
        self, bucket: int, block_m: int, block_n: int, flush: torch.Tensor
    ) -> list[Callable[[], Any]]:
        """One call per layer, each after a memset of `flush` (the weights' read in the model)."""

        def call(layer: int) -> None:
            k, v = self.caches[layer]
            flush.zero_()
            prefill_attention(
                self.q, k, v, self.table, self.rows, self.starts, self.lens, self.scale,
                bucket, out=self.out[layer], block_m=block_m, block_n=block_n,
            )  # fmt: skip

        return [functools.partial(call, layer) for layer in range(len(self.caches))]


def sweep_case(
    shape: TextShape, args: argparse.Namespace, case_spec: tuple[int, int, int], flush: torch.Tensor
) -> list[dict[str, Any]]:
    queries, bucket, context = case_spec
    device = flush.device
    case = Case(shape, args.layers, queries, context, device)
    element_size = case.q.element_size()
    default = tuple(_launch_config(bucket, padded_head_dim(case.q.shape[-1]), element_size)[:2])
    flush_us = graph_us([flush.zero_] * args.layers, device, args.reps)
    rows = []
    reference = None
    for block_m, block_n in [default, *BLOCKS]:
        calls = case.layer_calls(bucket, block_m, block_n, flush)
        case.out.zero_()
        for call in calls:
            call()
        if reference is None:
            reference = case.out.float().clone()
        error = (case.out.float() - reference).abs().max().item()
        us = graph_us(calls, device, args.reps) - flush_us  # NaN off CUDA: a check only
        row = {"queries": queries, "bucket": bucket, "context": context, "block_m": block_m,
               "block_n": block_n, "us_per_call": us, "max_abs_diff": error,
               "launch_default": (block_m, block_n) == default}  # fmt: skip
        rows.append(row)
        log(f"q {queries}/{bucket} over {context}: {block_m} x {block_n} {us:8.2f} us "
            f"(diff {error:.3g}){' default' if row['launch_default'] else ''}")  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="tiny heads and cases (CPU check)")
    parser.add_argument("--layers", type=int, default=None, help="calls per graph (28; tiny 2)")
    parser.add_argument("--reps", type=int, default=40, help="graph replays per timing")
    parser.add_argument("--flush_mb", type=int, default=96, help="memset before each call")
    args = parser.parse_args()
    device = pick_device()
    shape = TINY_TEXT if args.tiny else QWEN25_7B
    args.layers = args.layers or (2 if args.tiny else shape.layers)
    flush = torch.empty((1 if args.tiny else args.flush_mb) << 20, dtype=torch.uint8, device=device)
    results: dict[str, Any] = {
        "meta": run_metadata(device),
        "settings": {
            "layers": args.layers,
            "reps": args.reps,
            "flush_mb": args.flush_mb,
            "heads": shape.heads,
            "kv_heads": shape.kv_heads,
            "head_dim": shape.hidden // shape.heads,
        },
        "rows": [],
    }
    with runtime_loop_bounds():
        for case_spec in TINY_CASES if args.tiny else CASES:
            results["rows"] += sweep_case(shape, args, case_spec, flush)
            write_json(args.out, results)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
