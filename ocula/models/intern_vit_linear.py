"""The InternViT's fc1 and its activation in one GEMM on Hopper GPUs: the ping-pong kernel of
`ocula.kernels.pingpong_linear` looks each output up in the activation's table as it leaves the
accumulator, instead of a second pass over fc1's output (`ocula.kernels.table_activation`).

The same bits as `fc1(x)` followed by the table pass (tests/kernels). Only fc1: on the ViT's
other projections the kernel alone was slower than cuBLAS (BENCHMARKS.md, thirtieth session).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch

from ocula.layers.linear import ColumnParallelLinear

logger = logging.getLogger(__name__)

# A constant; the benchmarks' `--switches pingpong=off` clears it for an A/B against cuBLAS and
# the separate table pass.
USE_PINGPONG = True
# Inside a CUDA graph's capture any batch of at least MIN_ROWS rows takes the kernel (one 448-px
# tile has 1025 tokens). Eagerly only from EAGER_MIN_ROWS (24 tiles) on: each launch of the Gluon
# kernel holds the host ~0.16 ms longer than cuBLAS's and the table's launches together (24 a
# forward), and an eager encoder of 8 tiles was host-bound on one H100 host (18.3 ms against
# 14.4 ms without the kernel), while at 32 tiles the GPU work covers it (47.1-48.4 against
# 49.6-49.7 ms). The engine runs up to 16 tiles as CUDA graphs.
MIN_ROWS = 1024
EAGER_MIN_ROWS = 24 * 1025


def fc1_with_table_activation(
    fc1: ColumnParallelLinear, x: torch.Tensor, activation: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor | None:
    """activation(fc1(x)) through the ping-pong GEMM with the activation's lookup table, or None
    where that path does not apply (the caller then runs fc1 and the activation itself).
    `activation` computes each element alone (see `ocula.kernels.table_activation`); its table
    must exist before a CUDA graph's capture (`warm_up_fc1_kernel` builds it)."""
    if not (USE_PINGPONG and x.is_cuda) or _failed_warm_up or not kernel_importable():
        return None
    if not gluon_launch_pays(x.numel() // x.shape[-1]):
        return None
    return _fused_fc1(fc1, x.reshape(-1, x.shape[-1]), activation, x.shape[:-1])


def gluon_launch_pays(rows: int) -> bool:
    """Whether a Gluon kernel over `rows` ViT rows is worth its host-side launch here: any batch
    of MIN_ROWS inside a CUDA graph's capture, eagerly only from EAGER_MIN_ROWS."""
    capturing = torch.cuda.is_current_stream_capturing()
    return rows >= (MIN_ROWS if capturing else EAGER_MIN_ROWS)


def warm_up_fc1_kernel(
    fc1: ColumnParallelLinear, activation: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    """Builds the table and compiles the kernel for fc1's shape now (start-up), not in the first
    large batch: one block of zero rows takes the same compiled kernel as any batch."""
    global _failed_warm_up
    if not (USE_PINGPONG and fc1.weight.is_cuda and kernel_importable()):
        return
    weight = fc1.weight
    rows = torch.zeros(128, weight.shape[1], dtype=weight.dtype, device=weight.device)
    try:
        _fused_fc1(fc1, rows, activation, rows.shape[:-1])
    except Exception as error:  # an optional kernel: the exact path without it stays
        _failed_warm_up = f"{type(error).__name__}: {error}"
        logger.warning("fc1's fused kernel is off (it failed at start-up): %s", _failed_warm_up)


# Why the kernel is off for this process, if its warm-up failed.
_failed_warm_up: str | None = None


@functools.cache
def kernel_importable() -> bool:
    """Whether this Triton has Gluon with its Hopper API (`triton.experimental.gluon`; the kernel
    was written against Triton 3.6): without it fc1 and its activation keep cuBLAS and the table
    pass."""
    try:
        import ocula.kernels.pingpong_linear  # noqa: F401
    except ImportError:
        return False
    return True


def _fused_fc1(
    fc1: ColumnParallelLinear,
    rows: torch.Tensor,
    activation: Callable[[torch.Tensor], torch.Tensor],
    leading_shape: torch.Size,
) -> torch.Tensor | None:
    from ocula.kernels.pingpong_linear import pingpong_applies, pingpong_linear
    from ocula.kernels.table_activation import TABLE_DTYPES, activation_table

    if rows.dtype not in TABLE_DTYPES or not pingpong_applies(rows, fc1.weight, fc1.bias):
        return None
    table = activation_table(activation, rows.dtype, rows.device)
    out = pingpong_linear(rows, fc1.weight, fc1.bias, activation_table=table)
    return out.view(*leading_shape, out.shape[-1])
