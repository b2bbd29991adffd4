"""A pre-norm decoder layer for one row (a batch-1 step) with its RMSNorms folded into the GEMVs.

The projections that add into the residual stream (o_proj, down) add in their epilogue and write
the new stream's sum of squares in pieces; the projections after a norm (gate/up, the next
layer's qkv) normalize the stream as they read it (`ocula.kernels.gemv_residual`). A layer thus
launches no norm kernel of its own: two launches fewer per layer on the step's critical path.
The first layer's input norm (of the embeddings) and the final norm stay separate launches.

Between layers the stream travels as a `FoldedResidual` in place of (hidden, residual): the add
is already done. Same roundings as the unfused layer but for the order of the float32 sum of
squares (see the kernel module).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ocula.engine.forward_batch import ForwardBatch
from ocula.layers.linear import gemv_takes
from ocula.layers.norm import RMSNorm
from ocula.layers.rotary import Rope

if TYPE_CHECKING:
    from ocula.models.decoder_blocks import GatedMLP, SelfAttention

# Whether one-row steps fold their norms into the GEMVs. A constant; the benchmark scripts'
# `--switches` (benchmarks/common.py) set it before building the engine.
FOLD_ROW_NORMS = True


@dataclass(frozen=True)
class FoldedResidual:
    """The residual stream after a folded layer: its output already added (`stream`, [1,
    hidden]) and the float32 sum of squares of the stream in pieces (`partial_squares`)."""

    stream: torch.Tensor
    partial_squares: torch.Tensor


def folds_row_norms(
    hidden: torch.Tensor,
    attention_norm: RMSNorm,
    attention: SelfAttention,
    mlp_norm: RMSNorm,
    mlp: GatedMLP,
) -> bool:
    """Whether this layer's step on `hidden` can run folded: one row on the GPU, every
    projection one the GEMV takes, norm weights of the activation dtype, and no tensor
    parallelism in the projections that add into the stream (there the add follows an
    all-reduce)."""
    if not FOLD_ROW_NORMS or hidden.dim() != 2 or hidden.shape[0] != 1:
        return False
    if not hidden.is_contiguous():
        return False
    if attention.o_proj.tp.size != 1 or mlp.down_proj.tp.size != 1:
        return False
    projections = (attention.qkv_proj, attention.o_proj, mlp.gate_up_proj, mlp.down_proj)
    norms = (attention_norm.weight, mlp_norm.weight)
    return all(gemv_takes(hidden, p.weight, p.bias) for p in projections) and all(
        w.dtype == hidden.dtype and w.is_contiguous() for w in norms
    )


def folded_row_step(
    attention_norm: RMSNorm,
    attention: SelfAttention,
    mlp_norm: RMSNorm,
    mlp: GatedMLP,
    hidden: torch.Tensor | None,
    residual: torch.Tensor | FoldedResidual | None,
    rope: Rope,
    batch: ForwardBatch,
) -> tuple[None, FoldedResidual]:
    """One layer on one row. Takes the unfused state (hidden, residual or None) of the first
    layer or the `FoldedResidual` of the previous one; consumes the stream in place."""
    from ocula.kernels.gemv import RowNorm
    from ocula.kernels.gemv_residual import (
        gemv_add_residual,
        normed_gemv,
        normed_gemv_silu_and_mul,
    )

    qkv_proj, o_proj = attention.qkv_proj, attention.o_proj
    if isinstance(residual, FoldedResidual):
        stream = residual.stream
        norm = RowNorm(attention_norm.weight, attention_norm.eps, residual.partial_squares)
        qkv = normed_gemv(stream, norm, qkv_proj.weight, qkv_proj.bias)
    else:
        if hidden is None:
            raise ValueError("an unfused layer state needs its hidden states")
        if residual is None:
            stream, normed = hidden, attention_norm(hidden)
        else:
            normed, stream = attention_norm(hidden, residual)
        qkv = qkv_proj(normed)
    attended = attention.attend(qkv, rope, batch).reshape(1, -1)
    squares = gemv_add_residual(attended, o_proj.weight, o_proj.bias, stream)
    gate_up, down = mlp.gate_up_proj, mlp.down_proj
    norm = RowNorm(mlp_norm.weight, mlp_norm.eps, squares)
    activated = normed_gemv_silu_and_mul(stream, norm, gate_up.weight, gate_up.bias)
    squares = gemv_add_residual(activated, down.weight, down.bias, stream)
    return None, FoldedResidual(stream, squares)
