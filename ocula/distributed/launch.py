"""Joining the ranks of one tensor-parallel server: rendezvous, process groups, devices, and the
check that a model's shapes split over `tp` ranks.

Rendezvous goes through a `torch.distributed.TCPStore` that rank 0 hosts on
`--nccl_host:--nccl_port`; the other ranks connect to it. The LLM's collectives run on NCCL when
the device is CUDA and on gloo on the CPU; step plans and sizes always travel over a gloo group
(`ParallelGroup.cpu_group`).
"""

from __future__ import annotations

import gc
import logging
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ocula.distributed.parallel_group import ParallelGroup

logger = logging.getLogger(__name__)

# How long a collective (or the rendezvous) may wait for a peer. Ranks that load weights at
# different speeds wait for each other at the first collective; an idle rank 0 sends heartbeats
# well within this, so idle followers never time out.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


def open_rendezvous(
    host: str, port: int, world_size: int, allow_other_port: bool = True
) -> dist.TCPStore:
    """Rank 0's store on `host:port`. When that port is taken and `allow_other_port` (one node:
    the followers are told the port actually used), a free port on `host` instead."""
    try:
        return _store(host, port, world_size, is_master=True)
    except dist.DistNetworkError as error:
        if "EADDRINUSE" not in str(error) or not allow_other_port:
            raise
    store = _store(host, 0, world_size, is_master=True)
    logger.warning(
        "--nccl_port %d is in use on %s; the ranks meet on free port %d instead",
        port,
        host,
        store.port,
    )
    return store


def join_rendezvous(host: str, port: int, world_size: int) -> dist.TCPStore:
    """A follower's connection to rank 0's store."""
    return _store(host, port, world_size, is_master=False)


def _store(host: str, port: int, world_size: int, is_master: bool) -> dist.TCPStore:
    return dist.TCPStore(
        host,
        port,
        world_size,
        is_master=is_master,
        timeout=COLLECTIVE_TIMEOUT,
        wait_for_workers=False,
    )


def check_devices_for_ranks(device: torch.device, ranks_here: int) -> None:
    """Raises ValueError when this machine's ranks (one GPU each) outnumber its CUDA devices:
    the surplus rank would fail after rank 0 began waiting for the group (30 minutes)."""
    if device.type != "cuda":
        return
    available = torch.cuda.device_count()
    if ranks_here > available:
        raise ValueError(
            f"--tp puts {ranks_here} ranks on this machine, one GPU each, but torch sees "
            f"{available} CUDA device(s) (CUDA_VISIBLE_DEVICES picks which)"
        )


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """Each rank its own GPU of its node (`cuda:local_rank`); the CPU is shared."""
    if device.type == "cuda":
        return torch.device("cuda", local_rank)
    return device


def init_rank(
    store: dist.TCPStore, rank: int, world_size: int, device: torch.device
) -> ParallelGroup:
    """Initialises torch.distributed for this rank (collective: every rank must call it)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group(
            "nccl",
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=COLLECTIVE_TIMEOUT,
            device_id=device,
        )
        cpu_group = dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)
        return ParallelGroup(rank, world_size, dist.group.WORLD, cpu_group)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT
    )
    return ParallelGroup(rank, world_size, dist.group.WORLD)


def leave_group() -> None:
    """Tears torch.distributed down in this process, if it was set up, and frees its groups.

    Call it once nothing refers to a process group any more (no runner, no `ParallelGroup`): a
    gloo group's worker threads stop only when its last reference goes, and one still finishing
    a collective when the interpreter exits aborts the process (it dies taking the GIL)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.unfreeze()  # the models and runners of start-up were frozen (`gc_heap`): collect them too
    gc.collect()  # groups kept alive by reference cycles (models, runners) go now


# -- which tp sizes a model takes ---------------------------------------------------------------
def check_model_splits(model_config: Any, tp: int, visual_tp: int) -> None:
    """Raises ValueError when the model's heads or widths do not split over `tp` LLM ranks and
    `visual_tp` ViT ranks, naming the reason and the --tp values that would work."""
    reason = _split_problem(model_config, tp, visual_tp)
    if reason is None:
        return
    text = getattr(model_config, "text_config", model_config)
    valid = [
        size
        for size in range(1, text.num_attention_heads + 1)
        if _split_problem(model_config, size, size) is None
    ]
    raise ValueError(
        f"--tp {tp} does not fit this model: {reason}; valid --tp values: "
        + ", ".join(str(size) for size in valid)
    )


def _split_problem(model_config: Any, tp: int, visual_tp: int) -> str | None:
    text = getattr(model_config, "text_config", model_config)
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if heads % tp:
        return f"its {heads} attention heads are not divisible by {tp}"
    if kv_heads % tp and tp % kv_heads:
        # KV heads are split when there are at least tp of them, else replicated evenly.
        return f"its {kv_heads} KV heads neither divide by {tp} nor divide {tp}"
    if text.intermediate_size % tp:
        return f"its MLP width {text.intermediate_size} is not divisible by {tp}"
    vision = getattr(model_config, "vision_config", None)
    if vision is None:
        return None
    # The ViT's heads need not divide: InternViT pads them to a multiple of visual_tp.
    if vision.intermediate_size % visual_tp or text.hidden_size % visual_tp:
        return f"its vision encoder's MLP or projector width is not divisible by {visual_tp}"
    return None
