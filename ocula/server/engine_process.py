"""The engine process: an `EngineCore` stepping in a loop, fed and drained over ZMQ.

It leaves when the front sends `Shutdown`, when the front process dies (checked while idle and
between steps), or on an error it cannot recover from, which it reports as `EngineFailed`
before exiting non-zero.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import sys
import traceback

import zmq

from ocula.engine.engine_core import EngineCore, RequestRejectedError
from ocula.engine.model_setup import resolve_model
from ocula.engine.request import Request
from ocula.server.args import ServerArgs
from ocula.server.from_engine import EngineFailed, EngineReady, RequestFailed, StepOutputs
from ocula.server.to_engine import AbortRequest, AddRequest, Shutdown

logger = logging.getLogger("ocula.engine")

IDLE_POLL_MS = 200


def run_engine_process(args: ServerArgs, inbox_address: str, outbox_address: str) -> None:
    """Process entry point (spawned by the front)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    context = zmq.Context()
    inbox = context.socket(zmq.PULL)
    inbox.connect(inbox_address)
    outbox = context.socket(zmq.PUSH)
    outbox.connect(outbox_address)
    try:
        core = EngineCore(args, resolve_model(args))
        outbox.send(
            pickle.dumps(
                EngineReady(
                    kv_capacity=core.allocator.capacity,
                    max_req_total_len=core.max_req_total_len,
                    batch_max_tokens=core.scheduler.batch_max_tokens,
                )
            )
        )
        _serve(core, inbox, outbox)
    except Exception as error:  # report, then exit non-zero: the front must not hang
        message = f"{type(error).__name__}: {error}"
        logger.error("engine failed: %s\n%s", message, traceback.format_exc())
        outbox.send(pickle.dumps(EngineFailed(message)))
        outbox.close(linger=2000)
        context.term()
        sys.exit(1)
    outbox.close(linger=1000)
    inbox.close(linger=0)
    context.term()


def _serve(core: EngineCore, inbox: zmq.Socket, outbox: zmq.Socket) -> None:
    parent = multiprocessing.parent_process()
    poller = zmq.Poller()
    poller.register(inbox, zmq.POLLIN)
    while True:
        timeout = 0 if core.has_unfinished() else IDLE_POLL_MS
        while poller.poll(timeout):
            message = pickle.loads(inbox.recv())
            if isinstance(message, Shutdown):
                return
            _handle(core, message, outbox)
            timeout = 0
        if parent is not None and not parent.is_alive():
            logger.info("the front process is gone; engine process %d exits", os.getpid())
            return
        if core.has_work():
            updates = core.step()
            outputs = StepOutputs(updates, core.stats(), core.take_vit_batch_sizes())
            outbox.send(pickle.dumps(outputs))


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
