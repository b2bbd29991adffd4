"""The engine process: an `EngineCore` stepping in a loop, fed and drained over ZMQ.

It leaves when the front sends `Shutdown`, when the front process dies (checked while idle and
between steps), or on an error it cannot recover from, which it reports as `EngineFailed`
before exiting non-zero.

With `--tp N` this process is rank 0: it spawns ranks 1..N-1 (`FollowerRanks`), broadcasts every
step's plan to them, checks between steps that they are alive and stops them when it leaves. A
rank that dies makes this process report `EngineFailed` naming it, so the front exits non-zero.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import sys
import time
import traceback

import zmq

from ocula.distributed.launch import check_model_splits
from ocula.distributed.parallel_group import SINGLE_RANK
from ocula.engine.engine_core import EngineCore, EngineStats, RequestRejectedError
from ocula.engine.model_setup import resolve_model
from ocula.engine.request import Request
from ocula.engine.tp_worker import FollowerRanks, RankDiedError
from ocula.server.args import ServerArgs
from ocula.server.from_engine import EngineFailed, EngineReady, RequestFailed, StepOutputs
from ocula.server.to_engine import AbortRequest, AddRequest, Shutdown
from ocula.utils.device import set_host_threads

logger = logging.getLogger("ocula.engine")

IDLE_POLL_MS = 200
SHUTDOWN_WAIT_SECONDS = 10.0


def run_engine_process(args: ServerArgs, inbox_address: str, outbox_address: str) -> None:
    """Process entry point (spawned by the front)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    context = zmq.Context()
    inbox = context.socket(zmq.PULL)
    inbox.connect(inbox_address)
    outbox = context.socket(zmq.PUSH)
    outbox.connect(outbox_address)
    followers: FollowerRanks | None = None
    try:
        setup = resolve_model(args)
        set_host_threads(setup.device, args.ranks_per_node)
        tp = SINGLE_RANK
        if args.tp > 1:
            check_model_splits(setup.model_config, args.tp, args.effective_visual_tp)
            followers = FollowerRanks(args, setup)
            setup, tp = followers.setup, followers.group
        core = EngineCore(args, setup, tp)
        outbox.send(
            pickle.dumps(
                EngineReady(
                    kv_capacity=core.allocator.capacity,
                    max_req_total_len=core.max_req_total_len,
                    batch_max_tokens=core.scheduler.batch_max_tokens,
                )
            )
        )
        _serve(core, inbox, outbox, followers)
    except Exception as error:  # report, then exit non-zero: the front must not hang
        message = f"{type(error).__name__}: {error}"
        if followers is not None and not isinstance(error, RankDiedError):
            dead = followers.dead_rank_message()  # a failed collective: did a rank die?
            if dead is not None:
                message = f"{dead}; {message}"
        logger.error("engine failed: %s\n%s", message, traceback.format_exc())
        outbox.send(pickle.dumps(EngineFailed(message)))
        if followers is not None:
            followers.stop(graceful=False)
        _await_shutdown(inbox)
        outbox.close(linger=2000)
        inbox.close(linger=0)  # context.term() waits for every socket to be closed
        context.term()
        sys.exit(1)
    if followers is not None:
        del core, tp  # the group's last references go in `stop` (see `leave_group`)
        followers.stop(graceful=True)
    outbox.close(linger=1000)
    inbox.close(linger=0)
    context.term()


def _serve(
    core: EngineCore, inbox: zmq.Socket, outbox: zmq.Socket, followers: FollowerRanks | None
) -> None:
    parent = multiprocessing.parent_process()
    poller = zmq.Poller()
    poller.register(inbox, zmq.POLLIN)
    sent_stats: EngineStats | None = None
    while True:
        timeout = 0 if core.has_work() else IDLE_POLL_MS
        while poller.poll(timeout):
            message = pickle.loads(inbox.recv())
            if isinstance(message, Shutdown):
                return
            _handle(core, message, outbox)
            timeout = 0
        if parent is not None and not parent.is_alive():
            logger.info("the front process is gone; engine process %d exits", os.getpid())
            return
        if followers is not None:
            followers.check_alive()
        if core.has_work():
            updates = core.step()
            if followers is not None:
                followers.note_step()
            stats, vit_batch_sizes = core.stats(), core.take_vit_batch_sizes()
            # A step with nothing new for the front (an overlapped step's first half, an empty
            # plan) sends nothing: each message wakes the front, and one that arrives right
            # after a token delays that token's delivery.
            if updates or vit_batch_sizes or stats != sent_stats:
                outbox.send(pickle.dumps(StepOutputs(updates, stats, vit_batch_sizes)))
                sent_stats = stats
        elif followers is not None:
            followers.heartbeat_if_due()


def _await_shutdown(inbox: zmq.Socket) -> None:
    """After EngineFailed: the front answers with Shutdown while it sees this process alive, and
    its push would block forever once the inbox is closed; so the inbox is read until Shutdown
    arrives, the front is gone, or SHUTDOWN_WAIT_SECONDS pass."""
    parent = multiprocessing.parent_process()
    deadline = time.monotonic() + SHUTDOWN_WAIT_SECONDS
    while time.monotonic() < deadline and (parent is None or parent.is_alive()):
        if inbox.poll(IDLE_POLL_MS) and isinstance(pickle.loads(inbox.recv()), Shutdown):
            return


def _handle(core: EngineCore, message: object, outbox: zmq.Socket) -> None:
    if isinstance(message, AddRequest):
        request = Request(
            message.request_id,
            message.prompt_token_ids,
            message.sampling_params,
            message.eos_token_ids,
            images=message.images,
        )
        try:
            core.add_request(request)
        except RequestRejectedError as error:
            outbox.send(pickle.dumps(RequestFailed(message.request_id, str(error))))
    elif isinstance(message, AbortRequest):
        core.abort_request(message.request_id)
    else:
        raise TypeError(f"unexpected message {type(message).__name__}")
