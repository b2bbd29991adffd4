"""A handle on one tensor-parallel group, passed explicitly to the layers that shard over it.

There is no module-level "current group": a model is built with the group it runs in, so two
models with different groups (the LLM over `tp` ranks, the ViT over `visual_tp` ranks) can live
in one process and tests can build a model for any (rank, size) without initialising a backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ParallelGroup:
    """`rank` of `size` ranks; `process_group` is a torch.distributed group when `size > 1`.

    `cpu_group` is a gloo group over the same ranks for CPU-side values (step plans, sizes);
    None means `process_group` itself takes CPU tensors (gloo on CPU).
    """

    rank: int = 0
    size: int = 1
    process_group: Any = None
    cpu_group: Any = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} is outside a group of size {self.size}")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sums `x` over the group in place and returns it."""
        if self.size == 1:
            return x
        torch.distributed.all_reduce(x, group=self.process_group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenates every rank's `x` along `dim`, in rank order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        torch.distributed.all_gather(parts, x.contiguous(), group=self.process_group)
        return torch.cat(parts, dim=dim)

    def broadcast(self, x: torch.Tensor, src: int) -> torch.Tensor:
        """Rank `src`'s `x` (a rank of this group) into `x` on every rank, in place."""
        if self.size == 1:
            return x
        global_src = torch.distributed.get_global_rank(self.process_group, src)
        torch.distributed.broadcast(x, src=global_src, group=self.process_group)
        return x

    def broadcast_object(self, value: Any = None, src: int = 0) -> Any:
        """Rank `src`'s `value` (pickled) on every rank; every rank of the group must call it."""
        if self.size == 1:
            return value
        holder = [value]
        torch.distributed.broadcast_object_list(holder, src=src, group=self._cpu_side)
        return holder[0]

    def min_over_ranks(self, value: int) -> int:
        """The smallest `value` among the ranks; every rank of the group must call it."""
        if self.size == 1:
            return value
        x = torch.tensor([value], dtype=torch.int64)
        torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MIN, group=self._cpu_side)
        return int(x.item())

    @property
    def _cpu_side(self) -> Any:
        return self.cpu_group if self.cpu_group is not None else self.process_group


SINGLE_RANK = ParallelGroup()
