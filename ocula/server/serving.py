"""What every generation route shares: admission, metrics, streaming without premature headers,
and aborting when the client goes away."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request

from ocula.server.args import ServerArgs
from ocula.server.async_engine import AsyncEngine, PreparedRequest, StreamEvent
from ocula.server.errors import ClientDisconnectedError, OverloadedError
from ocula.server.metrics import ServerMetrics

DISCONNECT_POLL_SECONDS = 0.25


@dataclass
class ServerState:
    engine: AsyncEngine
    args: ServerArgs
    metrics: ServerMetrics
    in_flight: int = 0
    _ids: itertools.count = field(default_factory=itertools.count)

    @property
    def max_in_flight(self) -> int:
        return self.args.running_max_req_size + self.args.max_waiting_requests

    def new_request_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"


def server_state(request: Request) -> ServerState:
    return request.app.state.ocula


async def run_request(
    state: ServerState, request_id: str, prepared: PreparedRequest
) -> AsyncIterator[StreamEvent]:
    """The request's events, with admission control and metrics. Raises OverloadedError when the
    queue is full, and whatever `AsyncEngine.generate` raises."""
    if state.in_flight >= state.max_in_flight:
        state.metrics.requests.labels(status="overloaded").inc()
        raise OverloadedError(
            f"the server is at capacity ({state.in_flight} requests in flight); retry shortly"
        )
    metrics = state.metrics
    state.in_flight += 1
    metrics.in_flight.inc()
    arrival = last = time.monotonic()
    status = "aborted"
    num_tokens = 0
    cached = 0
    try:
        async for event in state.engine.generate(request_id, prepared):
            now = time.monotonic()
            if num_tokens == 0:
                metrics.ttft.observe(now - arrival)
            else:
                metrics.inter_token.observe(now - last)
            if event.queued_seconds is not None:
                metrics.queue_time.observe(event.queued_seconds)
            last = now
            num_tokens += 1
            cached = max(cached, event.num_cached_tokens)
            yield event
        status = "ok"
        metrics.e2e.observe(time.monotonic() - arrival)
    except ValueError:
        status = "rejected"
        raise
    except Exception:
        status = "error"
        raise
    finally:
        state.in_flight -= 1
        metrics.in_flight.dec()
        metrics.requests.labels(status=status).inc()
        metrics.prompt_tokens.inc(len(prepared.prompt_token_ids))
        metrics.generation_tokens.inc(num_tokens)
        metrics.cached_prompt_tokens.inc(cached)


async def primed(events: AsyncIterator[StreamEvent]) -> AsyncIterator[StreamEvent]:
    """Waits for the first event before returning, so that errors found while preparing the
    request become a status code instead of a broken stream."""
    first = await anext(events)

    async def replay() -> AsyncIterator[StreamEvent]:
        try:
            yield first
            async for event in events:
                yield event
        finally:
            await events.aclose()

    return replay()


async def collect_unless_disconnected(
    request: Request, events: AsyncIterator[StreamEvent]
) -> list[StreamEvent]:
    """All events of a non-streamed request; if the client disconnects first, the request is
    cancelled (which aborts it in the engine) and ClientDisconnectedError is raised."""

    async def collect() -> list[StreamEvent]:
        return [event async for event in events]

    task = asyncio.create_task(collect())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                await events.aclose()
                raise ClientDisconnectedError
    finally:
        if not task.done():
            task.cancel()
