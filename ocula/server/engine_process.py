"""The engine process: an `EngineCore` stepping in a loop, fed and drained over the front's
channel (`engine_channel.py`).

It leaves when the front sends `Shutdown`, when the front process dies or closes the channel
(checked while idle and between steps), or on an error it cannot recover from, which it reports
as `EngineFailed` before exiting non-zero.

With `--tp N` this process is rank 0: it spawns ranks 1..N-1 (`FollowerRanks`), broadcasts every
step's plan to them, checks between steps that they are alive and stops them when it leaves. A
rank that dies makes this process report `EngineFailed` naming it, so the front exits non-zero.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import sys
import time
import traceback

from ocula.distributed.launch import check_devices_for_ranks, check_model_splits
from ocula.distributed.parallel_group import SINGLE_RANK
from ocula.engine.engine_core import EngineCore, EngineStats, RequestRejectedError
from ocula.engine.model_setup import resolve_model
from ocula.engine.request import Request
from ocula.engine.tp_worker import FollowerRanks, RankDiedError
from ocula.engine.warm_up_request import warm_up_engine
from ocula.server.args import ServerArgs
from ocula.server.engine_channel import ChannelClosedError, EngineSideChannel
from ocula.server.from_engine import EngineFailed, EngineReady, RequestFailed, StepOutputs
from ocula.server.idle_wait import receive_spinning, spins_when_idle
from ocula.server.image_payloads import EnginePayloads
from ocula.server.to_engine import AbortRequest, AddRequest, Shutdown
from ocula.utils.child_signals import follow_parent_on_signals, loop_watches_parent
from ocula.utils.device import set_host_threads
from ocula.utils.gc_heap import freeze_heap_at_exit, freeze_startup_heap

logger = logging.getLogger("ocula.engine")

IDLE_POLL_MS = 200
SHUTDOWN_WAIT_SECONDS = 10.0


def run_engine_process(args: ServerArgs, channel_path: str) -> None:
    """Process entry point (spawned by the front, which listens at `channel_path`)."""
    follow_parent_on_signals()  # Ctrl-C / a group's SIGTERM: the front drains, then stops us
    freeze_heap_at_exit()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    channel = EngineSideChannel(channel_path)
    followers: FollowerRanks | None = None
    try:
        setup = resolve_model(args)
        set_host_threads(setup.device, args.ranks_per_node)
        tp = SINGLE_RANK
        if args.tp > 1:
            check_model_splits(setup.model_config, args.tp, args.effective_visual_tp)
            check_devices_for_ranks(setup.device, args.ranks_per_node)
            followers = FollowerRanks(args, setup)
            setup, tp = followers.setup, followers.group
        core = EngineCore(args, setup, tp)
        spin = spins_when_idle(args.idle_wait, setup.device.type)
        if not args.skip_server_warmup:
            warm_up_engine(core, setup.model_config, with_image=args.enable_multimodal)
        freeze_startup_heap("engine process")
        channel.send(
            EngineReady(
                kv_capacity=core.allocator.capacity,
                max_req_total_len=core.max_req_total_len,
                batch_max_tokens=core.scheduler.batch_max_tokens,
                spins_when_idle=spin,
            )
        )
        loop_watches_parent()  # `_serve` checks the front between steps and stops the ranks
        try:
            _serve(core, channel, followers, spin)
        except ChannelClosedError:  # a send found the front gone: as if it said Shutdown
            logger.info("the front closed the channel; engine process %d exits", os.getpid())
    except Exception as error:  # report, then exit non-zero: the front must not hang
        message = f"{type(error).__name__}: {error}"
        if followers is not None and not isinstance(error, RankDiedError):
            dead = followers.dead_rank_message()  # a failed collective: did a rank die?
            if dead is not None:
                message = f"{dead}; {message}"
        logger.error("engine failed: %s\n%s", message, traceback.format_exc())
        with contextlib.suppress(ChannelClosedError):
            channel.send(EngineFailed(message))
        if followers is not None:
            followers.stop(graceful=False)
        _await_shutdown(channel)
        channel.close()
        sys.exit(1)
    except BaseException:  # SIGTERM with the front gone, while loading: the ranks go too
        if followers is not None:
            followers.stop(graceful=False)  # else exiting joins ranks that ignore SIGTERM
        raise
    if followers is not None:
        del core, tp  # the group's last references go in `stop` (see `leave_group`)
        followers.stop(graceful=True)
    channel.close()


def _serve(
    core: EngineCore, channel: EngineSideChannel, followers: FollowerRanks | None, spin: bool
) -> None:
    """Steps while there is work; while there is none, waits for messages, spinning if `spin`
    (`idle_wait.py`)."""
    parent = multiprocessing.parent_process()
    sent_stats: EngineStats | None = None
    payloads = EnginePayloads()  # the image payloads received, mirrored by the front
    if core.tiling_fd is not None:
        channel.add_wakeup(core.tiling_fd)  # a finished tiling may make a request admissible
    while True:
        if core.has_work():  # a request whose image is still being tiled waits for the tiling
            messages = channel.receive(IDLE_POLL_MS if core.waiting_for_tiles else 0)
        elif spin:
            messages = receive_spinning(channel.receive, IDLE_POLL_MS / 1000)
        else:
            messages = channel.receive(IDLE_POLL_MS)
        for message in messages:
            if isinstance(message, Shutdown):
                return
            if isinstance(message, AddRequest):
                message = payloads.restore(message)
            _handle(core, message, channel)
        if channel.closed or (parent is not None and not parent.is_alive()):
            logger.info("the front process is gone; engine process %d exits", os.getpid())
            return
        if followers is not None:
            followers.check_alive()
        if core.has_work():
            updates = core.step(wait_for_tiles=False)
            if followers is not None:
                followers.note_step()
            stats, vit_batch_sizes = core.stats(), core.take_vit_batch_sizes()
            # A step with nothing new for the front (an overlapped step's first half, an empty
            # plan) sends nothing: each message wakes the front, and one that arrives right
            # after a token delays that token's delivery.
            if updates or vit_batch_sizes or stats != sent_stats:
                channel.send(StepOutputs(updates, stats, vit_batch_sizes))
                sent_stats = stats
            core.release_finished()  # after the send: a request's last token goes out first
        else:
            # Idle: an abort may have emptied the queues since the last step; the front's
            # gauges (/metrics, /token_load) must not keep the old numbers.
            stats = core.stats()
            if stats != sent_stats:
                channel.send(StepOutputs([], stats, []))
                sent_stats = stats
            if followers is not None:
                followers.heartbeat_if_due()


def _await_shutdown(channel: EngineSideChannel) -> None:
    """After EngineFailed: the front answers with Shutdown while it sees this process alive; the
    channel is read until Shutdown arrives, the front is gone, or SHUTDOWN_WAIT_SECONDS pass, so
    that the front's shutdown finds this process still reading."""
    parent = multiprocessing.parent_process()
    deadline = time.monotonic() + SHUTDOWN_WAIT_SECONDS
    while time.monotonic() < deadline and (parent is None or parent.is_alive()):
        try:
            messages = channel.receive(IDLE_POLL_MS)
        except ChannelClosedError:  # writing the EngineFailed still unsent found it gone
            return
        if channel.closed or any(isinstance(message, Shutdown) for message in messages):
            return


def _handle(core: EngineCore, message: object, channel: EngineSideChannel) -> None:
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
            channel.send(RequestFailed(message.request_id, str(error)))
    elif isinstance(message, AbortRequest):
        core.abort_request(message.request_id)
    else:
        raise TypeError(f"unexpected message {type(message).__name__}")
