"""How InternViT's weights split over a vision tensor-parallel group.

Head counts that the group does not divide (InternViT-6B's 25) are padded with zero heads
(`padded_heads`); the optional qk-norm is an RMSNorm over all heads' channels, so with sharded
heads its mean square is summed over the group (`ChannelShardedRMSNorm`); the loaders place a
checkpoint's qkv (either layout) and proj columns into this rank's padded shards.
"""

from __future__ import annotations

import torch
from torch import nn

from ocula.distributed.parallel_group import ParallelGroup
from ocula.layers.linear import (
    CheckpointTensor,
    QKVParallelLinear,
    RowParallelLinear,
    ShardId,
    copy_into,
    narrow_checkpoint,
)


def padded_heads(num_heads: int, tp_size: int) -> int:
    """InternViT's heads rounded up to a multiple of the vision TP size (InternViT-6B has 25).

    The extra heads come last and have all-zero weights and biases: their q, k and v are zero,
    so their attention output is zero, and `proj` has zero columns for them. Only the last
    ranks hold padding heads.
    """
    return -(-num_heads // tp_size) * tp_size


def copy_padded(
    part: torch.Tensor, loaded: CheckpointTensor, dim: int, start: int, stop: int
) -> None:
    """Fills `part` with checkpoint indices [start, start + part.shape[dim]) along `dim`; indices
    at or past `stop` (where the checkpoint's real heads end) are padding and become zeros."""
    length = part.shape[dim]
    real = max(0, min(length, stop - start))
    part.zero_()
    if real:
        copy_into(part.narrow(dim, 0, real), narrow_checkpoint(loaded, dim, start, real))


class ChannelShardedRMSNorm(nn.Module):
    """RMSNorm over `total_size` channels of which this rank holds the contiguous slice
    [rank * n, (rank + 1) * n), n = padded_size / tp.size (the channels of its heads, padding
    heads included: their channels are always zero, so the statistics divide by `total_size`).

    Numerics as transformers' RMSNorm: float32 statistics, cast back, then scale by the weight.
    """

    def __init__(
        self, total_size: int, eps: float, tp: ParallelGroup, padded_size: int | None = None
    ) -> None:
        super().__init__()
        self.tp = tp
        self.eps = eps
        self.total_size = total_size
        self.local_size = (padded_size or total_size) // tp.size
        self.weight = nn.Parameter(torch.empty(self.local_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(
        self, param: nn.Parameter, loaded: CheckpointTensor, shard_id: ShardId = None
    ) -> None:
        start = self.tp.rank * self.local_size
        copy_padded(param.data, loaded, 0, start, self.total_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.float32)
        if self.tp.size == 1 and self.local_size == self.total_size:
            mean_square = x32.pow(2).mean(-1, keepdim=True)
        else:
            squares = x32.pow(2).sum(-1, keepdim=True)
            mean_square = self.tp.all_reduce(squares) / self.total_size
        return self.weight * (x32 * torch.rsqrt(mean_square + self.eps)).to(x.dtype)


def load_qkv_any_layout(
    qkv: QKVParallelLinear,
    real_heads: int,
    param: nn.Parameter,
    loaded: CheckpointTensor,
    shard_id: ShardId,
) -> None:
    """weight_loader of `attn.qkv`: separate q/k/v tensors (shard "q"/"k"/"v", HF layout) or the
    original stacked `qkv` (shard None: rows [q heads | k heads | v heads], head-major). The
    checkpoint has `real_heads` heads; the layer may have padding heads past them (zeros)."""
    real_rows = real_heads * qkv.head_dim
    if shard_id is not None and not isinstance(shard_id, str):
        raise ValueError(f"QKV shard id must be one of {qkv.SHARDS}, got {shard_id!r}")
    projections = QKVParallelLinear.SHARDS if shard_id is None else (shard_id,)
    for projection in projections:
        base = QKVParallelLinear.SHARDS.index(projection) * real_rows if shard_id is None else 0
        offset, rows = qkv.local_rows(projection)
        start = base + qkv.local_heads(projection).start * qkv.head_dim
        copy_padded(param.data.narrow(0, offset, rows), loaded, 0, start, base + real_rows)


def load_proj_columns(
    proj: RowParallelLinear,
    real_size: int,
    param: nn.Parameter,
    loaded: CheckpointTensor,
    shard_id: ShardId = None,
) -> None:
    """weight_loader of `attn.proj`'s weight: this rank's input columns, zeros for padding heads."""
    cols = param.shape[1]
    copy_padded(param.data, loaded, 1, proj.tp.rank * cols, real_size)
