"""The graceful part of a shutdown: new requests refused, those still preparing their images
cancelled (each would be refused once ready), those in flight given time to finish, then
stopped."""

from __future__ import annotations

import asyncio
import logging
import time

from ocula.server.errors import ServerShuttingDownError
from ocula.server.serving import ServerState

logger = logging.getLogger(__name__)

DRAIN_POLL_SECONDS = 0.05
# After the grace period, how long the stopped requests get to send their error responses.
STOPPED_RESPONSE_SECONDS = 1.0


async def drain(state: ServerState, grace_seconds: float) -> None:
    """The graceful part of a shutdown. From the call on, new generation requests get 503
    (`server_shutting_down`) and /health is unhealthy; requests in flight get `grace_seconds`
    to finish, then the rest are stopped with ServerShuttingDownError (a 503, or a last error
    event on a stream that has started) and get a moment to send it. Returns when nothing is
    in flight or that moment has passed; the caller then stops the HTTP server."""
    state.draining = True
    for preparation in list(state.preparations):  # each would be refused when it is ready
        preparation.cancel()
    if state.in_flight:
        logger.info(
            "shutting down: %d request(s) in flight get up to %g s to finish",
            state.in_flight,
            grace_seconds,
        )
    if not await _until_idle(state, grace_seconds):
        stop_in_flight(state)
        await _until_idle(state, STOPPED_RESPONSE_SECONDS)


def stop_in_flight(state: ServerState) -> None:
    """Ends every request in flight with ServerShuttingDownError (the end of a drain, or a
    second signal that skips its wait)."""
    state.draining = True
    stopped = state.engine.stop_all(
        ServerShuttingDownError("the server is shutting down; the request was stopped")
    )
    if stopped:
        logger.warning("shutting down: stopped %d request(s) still running", stopped)


async def _until_idle(state: ServerState, timeout: float) -> bool:
    """Whether nothing is in flight or being prepared (a request still preparing is refused
    when it reaches `run_request`) before `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while (state.in_flight or state.preparing) and time.monotonic() < deadline:
        await asyncio.sleep(DRAIN_POLL_SECONDS)
    return state.in_flight == 0 and state.preparing == 0
