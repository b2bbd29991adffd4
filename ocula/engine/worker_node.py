"""A node other than node 0 (`--nnodes N --node_rank k`, k > 0): it runs its share of the ranks
and nothing else (no HTTP front, no scheduler).

It spawns ranks [k * tp/N, (k + 1) * tp/N) as followers (`tp_worker.run_follower`), which meet
rank 0 at `--nccl_host:--nccl_port` and then follow its step plans like any local follower. The
node's process watches them: when one exits non-zero (a failed collective, a crash) the others
are stopped and the node exits 1; when rank 0 asks them to stop they all exit 0 and so does the
node. SIGTERM or Ctrl-C stops the node's ranks and exits 0.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import time
from types import FrameType

from ocula.config import EngineArgs
from ocula.distributed.launch import check_devices_for_ranks
from ocula.engine.tp_worker import run_follower
from ocula.utils.device import pick_device

logger = logging.getLogger("ocula.node")

POLL_SECONDS = 0.2
STOP_SECONDS = 10.0


def run_worker_node(args: EngineArgs) -> int:
    """Runs this node's ranks until they leave; returns the node's exit status."""
    if args.node_rank == 0:
        raise ValueError("node 0 runs the server itself, not a worker node")
    check_devices_for_ranks(pick_device(args.device), args.ranks_per_node)
    spawn = multiprocessing.get_context("spawn")
    processes: dict[int, multiprocessing.process.BaseProcess] = {}
    stopping = False

    def request_stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for rank in args.local_ranks():
            process = spawn.Process(
                target=run_follower,
                args=(args, rank, args.nccl_host, args.nccl_port),
                name=f"ocula-tp-rank{rank}",
                daemon=True,
            )
            process.start()
            processes[rank] = process
            logger.info("tensor-parallel rank %d started (pid %d)", rank, process.pid)
        logger.info(
            "node %d of %d: ranks %d..%d join rank 0 at %s:%d",
            args.node_rank,
            args.nnodes,
            args.local_ranks()[0],
            args.local_ranks()[-1],
            args.nccl_host,
            args.nccl_port,
        )
        while not stopping:
            failed = [r for r, p in processes.items() if p.exitcode not in (None, 0)]
            if failed:
                logger.error(
                    "tensor-parallel rank %d exited with code %d; stopping this node",
                    failed[0],
                    processes[failed[0]].exitcode,
                )
                return 1
            if all(p.exitcode == 0 for p in processes.values()):
                logger.info("rank 0 stopped the ranks; node %d exits", args.node_rank)
                return 0
            time.sleep(POLL_SECONDS)
        logger.info("stop requested; node %d stops its ranks", args.node_rank)
        return 0
    finally:
        _stop_all(processes)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop_all(processes: dict[int, multiprocessing.process.BaseProcess]) -> None:
    """Kills the ranks still running (a rank ignores SIGTERM while its parent lives: the group
    signals of a terminal or service manager are this process's to handle)."""
    for process in processes.values():
        if process.is_alive():
            process.kill()
    for process in processes.values():
        process.join(STOP_SECONDS)
