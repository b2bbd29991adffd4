"""Tensor-parallel ranks 1..tp-1: processes that follow rank 0's step plans in lock-step.

Rank 0 is the engine process (scheduler, the channel to the front); it spawns the other ranks
itself, so the front keeps one process handle and rank 0 can watch its peers. The contract between
them is one stream of broadcasts over the group's gloo side, in which every rank takes part:

- a `StepPlan`: every rank runs it on its runner (rank 0 samples, the others only compute);
- `Heartbeat`: nothing to run (rank 0 sends one while idle, so followers blocked in the next
  broadcast never reach the collective timeout);
- `StopRanks`: leave the group and exit 0.

A follower exits non-zero when a collective fails (rank 0 or another rank died). Rank 0 checks
its followers between steps and names a dead one in the error it reports to the front.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from ocula.config import EngineArgs
from ocula.distributed.launch import (
    init_rank,
    join_rendezvous,
    leave_group,
    open_rendezvous,
    rank_device,
)
from ocula.distributed.parallel_group import ParallelGroup
from ocula.engine.engine_core import build_model_runner
from ocula.engine.model_setup import ModelSetup, resolve_model
from ocula.engine.step_plan import StepPlan
from ocula.utils.child_signals import follow_parent_on_signals, loop_watches_parent
from ocula.utils.device import set_host_threads
from ocula.utils.gc_heap import freeze_heap_at_exit, freeze_startup_heap

logger = logging.getLogger("ocula.engine.tp")

HEARTBEAT_SECONDS = 5.0
STOP_JOIN_SECONDS = 10.0
READY_KEY = "ocula/follower_ready/{rank}"
# Set by a follower once it has left the group after StopRanks. Rank 0 hosts the store the group
# runs on and waits for every follower's key before leaving and exiting itself: a follower still
# tearing its group down when rank 0's store vanished was aborted (C++ terminate, exit -6).
LEFT_KEY = "ocula/follower_left/{rank}"


@dataclass
class Heartbeat:
    """Rank 0 is alive and idle."""


@dataclass
class StopRanks:
    """Rank 0 is shutting down; followers leave the group and exit 0."""


class RankDiedError(RuntimeError):
    """A tensor-parallel rank exited; the server cannot go on without it."""


class FollowerRanks:
    """Rank 0's handle on ranks 1..tp-1: start them, broadcast to them, watch and stop them."""

    def __init__(self, args: EngineArgs, setup: ModelSetup) -> None:
        """Spawns this node's ranks 1..tp/nnodes-1, meeting every rank at --nccl_host:--nccl_port
        (on one node, another free port if that one is taken), and joins the group with them;
        `self.group` is rank 0's group and `self.setup` the model setup with rank 0's device.
        Ranks of other nodes are started there (`worker_node`); joining waits for them too.
        Raises RankDiedError when a local follower exits before joining."""
        store = open_rendezvous(
            args.nccl_host, args.nccl_port, args.tp, allow_other_port=args.nnodes == 1
        )
        self.processes: dict[int, multiprocessing.process.BaseProcess] = {}
        try:
            self._start(args, setup, store, args.nccl_host)
        except BaseException:
            self.stop(graceful=False)
            raise

    def _start(self, args: EngineArgs, setup: ModelSetup, store: dist.TCPStore, host: str) -> None:
        spawn = multiprocessing.get_context("spawn")
        for rank in args.local_ranks()[1:]:
            process = spawn.Process(
                target=run_follower,
                args=(args, rank, host, store.port),
                name=f"ocula-tp-rank{rank}",
                daemon=True,  # never outlive rank 0's normal exit
            )
            process.start()
            self.processes[rank] = process
            logger.info("tensor-parallel rank %d started (pid %d)", rank, process.pid)
        self._wait_until_joining(store)
        if args.nnodes > 1:
            logger.info(
                "waiting for ranks %d..%d on %d other node(s)",
                args.ranks_per_node,
                args.tp - 1,
                args.nnodes - 1,
            )
        device = rank_device(setup.device, 0)
        set_host_threads(device, args.ranks_per_node)
        self.setup = dataclasses.replace(setup, device=device)
        self.group: ParallelGroup = init_rank(store, 0, args.tp, device)
        self._store = store  # followers stay connected to it until they leave
        self.group.broadcast_object(node_flags(args))  # collective: see `check_same_flags`
        if self.group.min_over_ranks(1) == 0:
            raise ValueError(
                "a rank on another node was started with other engine flags than node 0 (that "
                "node's log names them): start every node with the same command apart from "
                "--node_rank"
            )
        self._last_broadcast = time.monotonic()

    def _wait_until_joining(self, store: dist.TCPStore) -> None:
        """Waits for every follower to reach the rendezvous, failing fast if one dies first
        (the group's own rendezvous would only time out)."""
        waiting = set(self.processes)
        while waiting:
            self.check_alive()
            waiting = {r for r in waiting if not store.check([READY_KEY.format(rank=r)])}
            time.sleep(0.1)

    def check_alive(self) -> None:
        """Raises RankDiedError naming the first follower that has exited."""
        for rank, process in self.processes.items():
            if not process.is_alive():
                raise RankDiedError(_death_message(rank, process))

    def dead_rank_message(self, wait_seconds: float = 3.0) -> str | None:
        """After a failed collective: which follower died, waiting a little for its exit to
        show; None if all are alive."""
        deadline = time.monotonic() + wait_seconds
        while True:
            for rank, process in self.processes.items():
                if not process.is_alive():
                    return _death_message(rank, process)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.1)

    def heartbeat_if_due(self) -> None:
        """Called while idle: keeps blocked followers inside the collective timeout."""
        if time.monotonic() - self._last_broadcast >= HEARTBEAT_SECONDS:
            self.group.broadcast_object(Heartbeat())
            self._last_broadcast = time.monotonic()

    def note_step(self) -> None:
        """A step's plan went out: no heartbeat is due for a while."""
        self._last_broadcast = time.monotonic()

    def stop(self, graceful: bool) -> None:
        """Stops every follower: asks them (when `graceful`), then terminates any still running.
        After a graceful stop rank 0 leaves the group too (a broken group is left to exit)."""
        asked = False
        if graceful:
            try:
                self.group.broadcast_object(StopRanks())
                asked = True
            except RuntimeError as error:  # a follower is already gone; the rest are killed
                logger.warning("could not ask the ranks to stop: %s", error)
        deadline = time.monotonic() + (STOP_JOIN_SECONDS if graceful else 0.0)
        for process in self.processes.values():
            process.join(max(0.0, deadline - time.monotonic()))
        for process in self.processes.values():
            if process.is_alive():  # SIGKILL: a rank ignores SIGTERM while rank 0 lives
                process.kill()
                process.join(5)
        if asked:
            self._wait_until_left(deadline)
        if graceful:
            del self.group  # its last reference: `leave_group` frees it (see there why)
            leave_group()

    def _wait_until_left(self, deadline: float) -> None:
        """Waits (until `deadline`) for every follower, on this node or another, to say it left
        the group; a rank already gone without saying so is not waited for past the deadline."""
        waiting = set(range(1, self.group.size))
        while waiting and time.monotonic() < deadline:
            waiting = {r for r in waiting if not self._store.check([LEFT_KEY.format(rank=r)])}
            if waiting:
                time.sleep(0.05)


def _death_message(rank: int, process: multiprocessing.process.BaseProcess) -> str:
    code = process.exitcode
    how = f"exit code {code}"
    if code is not None and code < 0:
        how = f"signal {signal.Signals(-code).name}"
    return f"tensor-parallel rank {rank} (pid {process.pid}) died ({how})"


# Engine flags that may differ between nodes: each node's own rank, paths and memory share, and
# the address by which it reaches node 0.
PER_NODE_FLAGS = ("node_rank", "model_dir", "nccl_host", "mem_fraction")


def node_flags(args: EngineArgs) -> dict[str, Any]:
    """The engine flags every node must share (the server's own flags are not compared)."""
    names = {f.name for f in dataclasses.fields(EngineArgs)} - set(PER_NODE_FLAGS)
    return {name: getattr(args, name) for name in sorted(names)}


def check_same_flags(group: ParallelGroup, args: EngineArgs, rank: int) -> None:
    """A follower's half of the start-up check (collective, after joining): ranks on other nodes
    run their own command line, and one flag that differs from node 0's (say
    --disable_overlap_schedule, which decides whether sampled tokens are broadcast each step)
    would leave the ranks issuing different collectives: a hang, not an error. Raises
    ValueError naming the differing flags; rank 0 raises too."""
    expected = group.broadcast_object(src=0)
    mine = node_flags(args)
    differing = [
        f"--{name} {mine.get(name)!r} here, {value!r} on node 0"
        for name, value in expected.items()
        if mine.get(name) != value
    ]
    group.min_over_ranks(0 if differing else 1)
    if differing:
        raise ValueError(
            f"rank {rank} was started with other flags than node 0: " + "; ".join(differing)
        )


# -- the follower process -------------------------------------------------------------------------
def run_follower(args: EngineArgs, rank: int, host: str, port: int) -> None:
    """Process entry of rank `rank` > 0 (spawned by rank 0, or by `worker_node` on another
    node)."""
    # Ctrl-C reaches the whole process group; a follower stops when rank 0 says so or dies.
    follow_parent_on_signals(death_signal=signal.SIGKILL)
    freeze_heap_at_exit()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        setup = resolve_model(args)
        device = rank_device(setup.device, rank - args.local_ranks()[0])
        set_host_threads(device, args.ranks_per_node)
        store = join_rendezvous(host, port, args.tp)
        store.set(READY_KEY.format(rank=rank), "1")
        _follow_steps(args, dataclasses.replace(setup, device=device), rank, store)
    except Exception:  # log with the rank, exit non-zero: rank 0 sees it and reports it
        logger.error("tensor-parallel rank %d failed:\n%s", rank, traceback.format_exc())
        sys.exit(1)
    leave_group()
    # Rank 0 may now take the store away; if it already has (it waits only so long), this rank
    # has still left cleanly.
    with contextlib.suppress(RuntimeError):  # torch's store errors derive from RuntimeError
        store.set(LEFT_KEY.format(rank=rank), "1")


def _follow_steps(args: EngineArgs, setup: ModelSetup, rank: int, store: dist.TCPStore) -> None:
    """Joins the group, builds this rank's model and runs rank 0's step plans until it says
    stop. The group and the runner are this call's locals, so they are gone when it returns and
    `leave_group` can free the group (see there why that matters)."""
    group = init_rank(store, rank, args.tp, setup.device)
    check_same_flags(group, args, rank)
    runner = build_model_runner(args, setup, group)
    freeze_startup_heap(f"tensor-parallel rank {rank}")
    loop_watches_parent()  # rank 0 stops this rank, or its death fails the next collective
    logger.info("tensor-parallel rank %d ready on %s", rank, setup.device)
    while True:
        message = group.broadcast_object(src=0)
        if isinstance(message, StopRanks):
            return
        if isinstance(message, StepPlan):
            runner.execute(message)
            runner.take_vit_batch_sizes()  # only rank 0 reports them
