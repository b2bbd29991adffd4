"""Tensor-parallel linear layers (Megatron names) whose parameters load their own TP slice.

Every parameter carries `weight_loader(param, loaded_weight, shard_id=None)`. `loaded_weight` is a
full checkpoint tensor: either a `torch.Tensor` or a lazy safetensors slice
(`safe_open(...).get_slice(name)`); the loader reads only this rank's rows or columns of it, so a
rank never materialises a whole weight it does not need. Weights are stored as nn.Linear stores
them, [output, input].

Sharding:
- column parallel: the output dimension is split; rank r holds output rows [r*n, (r+1)*n).
- row parallel: the input dimension is split; partial outputs are summed over the group inside
  `forward`, and the bias (not sharded) is added once, after the sum.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ocula.distributed.parallel_group import SINGLE_RANK, ParallelGroup
from ocula.kernels import use_triton

# Whether one row of x on the GPU goes to the GEMV kernel instead of cuBLAS. A constant; the
# benchmark scripts' `--switches` (benchmarks/common.py) set it before building the engine.
USE_GEMV = True
# Whether 2 to `SKINNY_MAX_ROWS` rows of x on the GPU go to the skinny kernel instead of cuBLAS
# (a constant, like USE_GEMV).
USE_SKINNY = True
SKINNY_MAX_ROWS = 32  # = ocula.kernels.skinny_linear.MAX_ROWS (that module imports Triton)


class LazySlice(Protocol):
    """The part of safetensors' slice API the loaders use."""

    def get_shape(self) -> list[int]: ...

    def __getitem__(self, index: Any) -> torch.Tensor: ...


CheckpointTensor = torch.Tensor | LazySlice
ShardId = str | int | None


def checkpoint_shape(loaded: CheckpointTensor) -> tuple[int, ...]:
    """Shape of a checkpoint tensor without reading its data."""
    if isinstance(loaded, torch.Tensor):
        return tuple(loaded.shape)
    return tuple(loaded.get_shape())


def narrow_checkpoint(loaded: CheckpointTensor, dim: int, start: int, length: int) -> torch.Tensor:
    """Indices [start, start + length) of `loaded` along `dim`, read from disk for a lazy slice."""
    if isinstance(loaded, torch.Tensor):
        return loaded.narrow(dim, start, length)
    index = (slice(None),) * dim + (slice(start, start + length),)
    return loaded[index]


def read_checkpoint(loaded: CheckpointTensor) -> torch.Tensor:
    """The whole tensor (for weights every rank holds in full)."""
    if isinstance(loaded, torch.Tensor):
        return loaded
    return loaded[:]


def copy_into(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copies a checkpoint piece into (part of) a parameter, refusing silent broadcasting."""
    if tuple(param.shape) != tuple(value.shape):
        raise ValueError(
            f"checkpoint piece of shape {tuple(value.shape)} does not fit a parameter of shape "
            f"{tuple(param.shape)}"
        )
    param.data.copy_(value)


def _split(total: int, tp: ParallelGroup, what: str) -> int:
    if total % tp.size != 0:
        raise ValueError(f"{what} ({total}) is not divisible by the tensor-parallel size {tp.size}")
    return total // tp.size


def _new_param(*shape: int) -> nn.Parameter:
    """An uninitialised parameter on the default device and dtype (the loader fills it)."""
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


def gemv_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether x times weight^T (+ bias) goes to the GEMV kernel: one row of x on the GPU (a
    batch-1 decode step), where it streams the weight faster than cuBLAS (see
    `ocula.kernels.gemv`)."""
    return (
        x.shape[-1] == weight.shape[-1] > 0
        and x.numel() == x.shape[-1]
        and gemv_takes(x, weight, bias)
    )


def gemv_takes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the GEMV kernel takes this weight and bias for rows of x's dtype and device
    (shapes aside)."""
    return (
        USE_GEMV
        and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and x.dtype == weight.dtype
        and (bias is None or (bias.dtype == x.dtype and bias.is_contiguous()))
        and weight.is_contiguous()
        and use_triton(x)
    )


def skinny_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether x times weight^T (+ bias) goes to the skinny kernel: 2 to 32 rows of x on the GPU
    (a small batch's decode step, a short prefill chunk; see `ocula.kernels.skinny_linear`)."""
    depth = x.shape[-1]
    return (
        USE_SKINNY
        and depth == weight.shape[-1] > 0
        and 2 * depth <= x.numel() <= SKINNY_MAX_ROWS * depth
        and gemv_takes(x, weight, bias)
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through the GEMV kernel where `gemv_applies` and the skinny
    kernel where `skinny_applies`."""
    if gemv_applies(x, weight, bias):
        from ocula.kernels.gemv import gemv  # Triton is imported only on the CUDA path

        row = x.reshape(1, -1).contiguous()
        return gemv(row, weight, bias).view(*x.shape[:-1], weight.shape[0])
    if skinny_applies(x, weight, bias):
        from ocula.kernels.skinny_linear import skinny_linear

        rows = x.reshape(-1, x.shape[-1]).contiguous()
        return skinny_linear(rows, weight, bias).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def load_replicated(
    param: nn.Parameter, loaded: CheckpointTensor, shard_id: ShardId = None
) -> None:
    """weight_loader of parameters every rank holds whole (norm weights, row-parallel biases)."""
    copy_into(param, read_checkpoint(loaded))


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's output rows split over `tp`; output stays sharded."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        tp: ParallelGroup = SINGLE_RANK,
    ) -> None:
        super().__init__()
        self.tp = tp
        self.input_size = input_size
        self.output_size_per_rank = _split(output_size, tp, "output size")
        self.weight = _new_param(self.output_size_per_rank, input_size)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = _new_param(self.output_size_per_rank)
            self.bias.weight_loader = self.weight_loader

    def weight_loader(
        self, param: nn.Parameter, loaded: CheckpointTensor, shard_id: ShardId = None
    ) -> None:
        rows = param.shape[0]
        copy_into(param, narrow_checkpoint(loaded, 0, self.tp.rank * rows, rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input fused into one matmul (gate and up).

    Each rank's weight is [shard 0 rows of this rank | shard 1 rows of this rank | ...], so the
    output splits into the logical projections with `torch.split(..., local_sizes)`.
    """

    def __init__(
        self,
        input_size: int,
        output_sizes: Sequence[int],
        bias: bool = False,
        tp: ParallelGroup = SINGLE_RANK,
    ) -> None:
        self.local_sizes = [_split(size, tp, "fused output size") for size in output_sizes]
        super().__init__(input_size, sum(output_sizes), bias, tp)

    def weight_loader(
        self, param: nn.Parameter, loaded: CheckpointTensor, shard_id: ShardId = None
    ) -> None:
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.local_sizes):
            raise ValueError(f"fused projection needs a shard index, got {shard_id!r}")
        rows = self.local_sizes[shard_id]
        offset = sum(self.local_sizes[:shard_id])
        piece = narrow_checkpoint(loaded, 0, self.tp.rank * rows, rows)
        copy_into(param.data.narrow(0, offset, rows), piece)


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection. Each rank's output is [its q heads | its k heads | its v heads].

    Query heads are split evenly. KV heads are split when `num_kv_heads >= tp.size`; otherwise
    each KV head is replicated on `tp.size // num_kv_heads` consecutive ranks, so every rank
    holds exactly the KV head its query heads use.
    """

    SHARDS = ("q", "k", "v")

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool = False,
        tp: ParallelGroup = SINGLE_RANK,
    ) -> None:
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.num_heads_per_rank = _split(num_heads, tp, "number of attention heads")
        if num_kv_heads >= tp.size:
            self.num_kv_heads_per_rank = _split(num_kv_heads, tp, "number of KV heads")
            self.first_kv_head = tp.rank * self.num_kv_heads_per_rank
        else:
            if tp.size % num_kv_heads != 0:
                raise ValueError(
                    f"tensor-parallel size {tp.size} is not a multiple of the number of KV "
                    f"heads ({num_kv_heads}), so KV heads cannot be replicated evenly"
                )
            self.num_kv_heads_per_rank = 1
            self.first_kv_head = tp.rank * num_kv_heads // tp.size
        local_heads = self.num_heads_per_rank + 2 * self.num_kv_heads_per_rank
        # The parent splits output_size by tp.size; pass the total that yields `local_heads`.
        super().__init__(hidden_size, local_heads * head_dim * tp.size, bias, tp)

    def local_heads(self, shard_id: str) -> range:
        """Global indices of the heads of projection `shard_id` held by this rank."""
        if shard_id == "q":
            first = self.tp.rank * self.num_heads_per_rank
            return range(first, first + self.num_heads_per_rank)
        if shard_id in ("k", "v"):
            return range(self.first_kv_head, self.first_kv_head + self.num_kv_heads_per_rank)
        raise ValueError(f"QKV shard id must be one of {self.SHARDS}, got {shard_id!r}")

    def local_rows(self, shard_id: str) -> tuple[int, int]:
        """(offset, length) of projection `shard_id` inside this rank's fused output."""
        q_rows = self.num_heads_per_rank * self.head_dim
        kv_rows = self.num_kv_heads_per_rank * self.head_dim
        offsets = {"q": (0, q_rows), "k": (q_rows, kv_rows), "v": (q_rows + kv_rows, kv_rows)}
        if shard_id not in offsets:
            raise ValueError(f"QKV shard id must be one of {self.SHARDS}, got {shard_id!r}")
        return offsets[shard_id]

    def copy_shard(self, param: nn.Parameter, shard_id: str, local_piece: torch.Tensor) -> None:
        """Copies this rank's already-sliced rows of projection `shard_id` into `param`."""
        offset, rows = self.local_rows(shard_id)
        copy_into(param.data.narrow(0, offset, rows), local_piece)

    def weight_loader(
        self, param: nn.Parameter, loaded: CheckpointTensor, shard_id: ShardId = None
    ) -> None:
        if not isinstance(shard_id, str):
            raise ValueError(f"QKV shard id must be one of {self.SHARDS}, got {shard_id!r}")
        heads = self.local_heads(shard_id)
        piece = narrow_checkpoint(
            loaded, 0, heads.start * self.head_dim, len(heads) * self.head_dim
        )
        self.copy_shard(param, shard_id, piece)

    def split_output(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q_rows = self.num_heads_per_rank * self.head_dim
        kv_rows = self.num_kv_heads_per_rank * self.head_dim
        q, k, v = qkv.split([q_rows, kv_rows, kv_rows], dim=-1)
        return q, k, v


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_r W_r^T, + b. The input is already split along its last dim."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        tp: ParallelGroup = SINGLE_RANK,
    ) -> None:
        super().__init__()
        self.tp = tp
        self.input_size_per_rank = _split(input_size, tp, "input size")
        self.output_size = output_size
        self.weight = _new_param(output_size, self.input_size_per_rank)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = _new_param(output_size)
            self.bias.weight_loader = load_replicated

    def weight_loader(
        self, param: nn.Parameter, loaded: CheckpointTensor, shard_id: ShardId = None
    ) -> None:
        cols = param.shape[1]
        copy_into(param, narrow_checkpoint(loaded, 1, self.tp.rank * cols, cols))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return linear(x, self.weight, self.bias)
        y = self.tp.all_reduce(linear(x, self.weight))
        if self.bias is not None:
            y = y + self.bias
        return y
