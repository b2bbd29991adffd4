"""`leave_group` frees the gloo groups, so none of their worker threads outlives it.

A gloo worker thread still releasing a finished collective while the interpreter shuts down
needs the GIL, dies taking it and aborts the process ("terminate called without an active
exception"): one rank in a few of CI's two-core runs did. `destroy_process_group` alone leaves
the threads of every group Python still refers to running.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from ocula.distributed.launch import init_rank, join_rendezvous, leave_group, open_rendezvous
from ocula.distributed.parallel_group import ParallelGroup

WORLD_SIZE = 2


def native_thread_count() -> int:
    """Threads of this process that Python did not start (torch's, gloo's)."""
    return len(os.listdir("/proc/self/task")) - threading.active_count()


def _use_groups_and_leave(rank: int, port: int, out: Path) -> None:
    torch.set_num_threads(1)
    before = native_thread_count()
    world = init_rank(
        join_rendezvous("127.0.0.1", port, WORLD_SIZE), rank, WORLD_SIZE, torch.device("cpu")
    )
    sub = ParallelGroup(rank, WORLD_SIZE, dist.new_group(list(range(WORLD_SIZE)), backend="gloo"))
    world.all_reduce(torch.ones(8))
    sub.broadcast(torch.ones(8), src=0)
    sub.broadcast_object({"step": 1})
    during = native_thread_count()
    # Like a model runner: the groups are reachable only through a reference cycle.
    holder: dict = {"world": world, "sub": sub}
    holder["self"] = holder
    del world, sub, holder
    leave_group()
    (out / f"rank{rank}.txt").write_text(f"{before} {during} {native_thread_count()}")


def test_leave_group_stops_every_group_thread(tmp_path: Path) -> None:
    store = open_rendezvous("127.0.0.1", 0, WORLD_SIZE + 1)  # the ranks join this one
    context = multiprocessing.get_context("spawn")
    ranks = [
        context.Process(target=_use_groups_and_leave, args=(rank, store.port, tmp_path))
        for rank in range(WORLD_SIZE)
    ]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(120)
    assert [process.exitcode for process in ranks] == [0] * WORLD_SIZE
    for rank in range(WORLD_SIZE):
        before, during, after = map(int, (tmp_path / f"rank{rank}.txt").read_text().split())
        assert during > before, f"rank {rank}: the groups started no threads to check"
        assert after == before, f"rank {rank}: {after - before} group threads still running"
