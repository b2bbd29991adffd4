"""How the vision encoder is spread over the `tp` ranks: `visual_dp` groups of `visual_tp` ranks.

Group g holds ranks [g * visual_tp, (g + 1) * visual_tp) and keeps a whole copy of the ViT, sharded
over its own ranks (tensor parallel inside the group). A step's images are dealt out among the
groups (`assign_images`), each group encodes its share, and every rank then receives every
image's embeddings from the first rank of the group that encoded it, because every LLM rank
splices all of them into its batch.

`visual_dp = 1` is one group of all ranks (the ViT sharded like the LLM); `visual_tp = 1` gives
every rank a whole ViT and no collectives inside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from ocula.distributed.parallel_group import SINGLE_RANK, ParallelGroup


@dataclass(frozen=True)
class VisionLayout:
    dp: int
    tp: int

    def group_of(self, rank: int) -> int:
        return rank // self.tp

    def leader_of(self, group: int) -> int:
        """The first rank of `group`, the one whose embeddings the other ranks receive."""
        return group * self.tp


def make_vision_group(world: ParallelGroup, layout: VisionLayout) -> ParallelGroup:
    """This rank's vision tensor-parallel group.

    Collective: every rank of `world` must call it with the same layout, because
    torch.distributed creates each subgroup on all ranks in the same order.
    """
    if layout.dp * layout.tp != world.size:
        raise ValueError(
            f"visual_dp ({layout.dp}) x visual_tp ({layout.tp}) must equal tp ({world.size})"
        )
    if layout.dp == 1:
        return world
    if layout.tp == 1:
        return SINGLE_RANK
    mine = layout.group_of(world.rank)
    handles = []
    cpu_handles = []
    for group in range(layout.dp):
        ranks = list(range(group * layout.tp, (group + 1) * layout.tp))
        handles.append(dist.new_group(ranks))
        if world.cpu_group is not None:
            cpu_handles.append(dist.new_group(ranks, backend="gloo"))
    return ParallelGroup(
        world.rank - layout.leader_of(mine),
        layout.tp,
        handles[mine],
        cpu_handles[mine] if cpu_handles else None,
    )


def assign_images(tile_counts: list[int], dp: int) -> list[int]:
    """The group that encodes each image: the one with the fewest tiles so far (ties: the lowest
    index), images taken in order. Deterministic, so every rank computes the same assignment."""
    load = [0] * dp
    owners = []
    for tiles in tile_counts:
        group = min(range(dp), key=lambda g: (load[g], g))
        owners.append(group)
        load[group] += tiles
    return owners
