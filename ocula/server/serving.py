"""What every generation route shares: admission (a request's images loaded under it), metrics,
and aborting when the client goes away (streaming without premature headers: `eager_streaming`;
the drain that starts a shutdown: `draining`)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request

from ocula.server.args import ServerArgs
from ocula.server.async_engine import AsyncEngine, PreparedRequest, StreamEvent
from ocula.server.errors import ClientDisconnectedError, OverloadedError, ServerShuttingDownError
from ocula.server.metrics import ServerMetrics
from ocula.server.request_errors import RequestError

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class ServerState:
    engine: AsyncEngine
    args: ServerArgs
    metrics: ServerMetrics
    in_flight: int = 0  # requests
    # Sequences of those requests (a request asking for n completions runs n): what the engine's
    # running and waiting queues hold, so what admission counts.
    sequences_in_flight: int = 0
    draining: bool = False  # set once by `drain`: new requests get 503, /health is unhealthy
    # Requests being prepared (`prepare_admitted`), and their sequences: not yet in flight,
    # but counted by admission so that image work stops once the server is full; a drain
    # cancels them.
    preparations: set[asyncio.Future] = field(default_factory=set)
    sequences_preparing: int = 0

    @property
    def preparing(self) -> int:
        return len(self.preparations)

    @property
    def max_in_flight(self) -> int:
        return self.args.running_max_req_size + self.args.max_waiting_requests

    def new_request_id(self, prefix: str) -> str:
        """`{prefix}-{random hex}`: unique across restarts and replicas (OpenAI's response ids,
        vLLM's too), so logs and clients never see one id twice."""
        return f"{prefix}-{uuid.uuid4().hex}"


def server_state(request: Request) -> ServerState:
    return request.app.state.ocula


async def run_request(
    state: ServerState, request_id: str, prepared: PreparedRequest
) -> AsyncIterator[StreamEvent]:
    """The request's events, with admission control and metrics. Raises ServerShuttingDownError
    while the server drains, OverloadedError when the queue is full, and whatever
    `AsyncEngine.generate` raises."""
    sequences = prepared.params.n
    admit(state, sequences, state.sequences_in_flight)
    metrics = state.metrics
    state.in_flight += 1
    state.sequences_in_flight += sequences
    metrics.in_flight.inc()
    metrics.lightllm.request_admitted()
    arrival = last = time.monotonic()
    first_token_s: float | None = None
    status = "aborted"
    num_tokens = 0
    cached = 0
    try:
        async for event in state.engine.generate(request_id, prepared):
            now = time.monotonic()
            if num_tokens == 0:
                first_token_s = now - arrival
                metrics.ttft.observe(first_token_s)
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
    except ServerShuttingDownError:
        status = "shutting_down"
        raise
    except Exception:
        status = "error"
        raise
    finally:
        state.in_flight -= 1
        state.sequences_in_flight -= sequences
        metrics.in_flight.dec()
        metrics.requests.labels(status=status).inc()
        metrics.prompt_tokens.inc(len(prepared.prompt_token_ids))
        metrics.generation_tokens.inc(num_tokens)
        metrics.cached_prompt_tokens.inc(cached)
        metrics.lightllm.request_finished(
            status,
            len(prepared.prompt_token_ids),
            cached,
            num_tokens,
            sequences,
            first_token_s,
            last - arrival if num_tokens else None,
        )
        if status == "aborted":  # the access log is off: this line is the request's 499
            logger.info(
                "%s: 499, the client left (or the request was cancelled) after %d token(s); "
                "aborted",
                request_id,
                num_tokens,
            )


def admit(state: ServerState, sequences: int, sequences_taken: int) -> None:
    """Raises ServerShuttingDownError while the server drains, RequestError for more sequences
    than it ever holds, OverloadedError when `sequences_taken` leave no room for `sequences`;
    each counted as a request of that status."""
    if state.draining:
        raise shutting_down(state)
    check_fits_at_once(state, sequences)
    if sequences_taken + sequences > state.max_in_flight:
        state.metrics.requests.labels(status="overloaded").inc()
        raise OverloadedError(
            f"the server is at capacity ({state.in_flight} requests, "
            f"{state.sequences_in_flight} sequences in flight, {state.preparing} preparing); "
            "retry shortly"
        )


async def prepare_admitted(
    request: Request, state: ServerState, sequences: int, prepare: Callable[[], Awaitable[T]]
) -> T:
    """`prepare()`'s result: a request's preparation (its images fetched, decoded and tiled,
    its prompt tokenized) under the admission its generation will meet, so that a server that
    drains or is full refuses before any image work (503), and cancelled if the client leaves
    first (ClientDisconnectedError): a fetch stops, a decoding thread's result is dropped."""
    admit(state, sequences, state.sequences_in_flight + state.sequences_preparing)
    task = asyncio.ensure_future(prepare())
    state.preparations.add(task)
    state.sequences_preparing += sequences
    state.metrics.preparing.inc()
    try:
        return await unless_disconnected(request, task, _nothing_to_clean)
    except asyncio.CancelledError:
        handler = asyncio.current_task()
        if state.draining and task.cancelled() and (handler is None or not handler.cancelling()):
            raise shutting_down(state) from None  # a drain cancelled it
        raise
    finally:
        state.preparations.discard(task)
        state.sequences_preparing -= sequences
        state.metrics.preparing.dec()


def shutting_down(state: ServerState) -> ServerShuttingDownError:
    """The refusal of a request that arrives, or would start, while the server drains; counted
    as a request of that status."""
    state.metrics.requests.labels(status="shutting_down").inc()
    return ServerShuttingDownError("the server is shutting down; retry on another replica")


async def _nothing_to_clean() -> None:
    return None


def check_fits_at_once(state: ServerState, sequences: int) -> None:
    """RequestError (400, not a 503 to retry) for work that could never be admitted: more
    sequences than running and waiting capacity together; counted as a rejected request."""
    if sequences > state.max_in_flight:
        state.metrics.requests.labels(status="rejected").inc()
        raise RequestError(
            f"the request asks for {sequences} sequences (prompts x n), more than this server "
            f"holds at once ({state.max_in_flight}: --running_max_req_size + "
            "--max_waiting_requests)"
        )


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


async def unless_disconnected(
    request: Request, work: Awaitable[T], cleanup: Callable[[], Awaitable[object]]
) -> T:
    """`work`'s result. If the client disconnects first, `work` is cancelled (a generation it
    waits on is aborted in the engine), `cleanup` is awaited, and ClientDisconnectedError is
    raised: a client that leaves while its request waits in the queue frees its place. The
    request's body must have been read. Whatever ends this call, `work` is finished (done or
    cancelled and waited for) when it returns."""
    task = asyncio.ensure_future(work)
    listener = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        try:
            await _cancel_and_wait({task})
        finally:
            await cleanup()
        raise ClientDisconnectedError
    finally:
        # Also when the handler itself is cancelled: `work` unwinds before this returns.
        await _cancel_and_wait({t for t in (task, listener) if not t.done()})


async def _cancel_and_wait(tasks: set[asyncio.Future]) -> None:
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: an error while being cancelled is not logged


async def _client_gone(request: Request) -> None:
    """Returns once the client has disconnected (or its connection failed). Once the body is
    read, the server's receive waits until then; no polling."""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception:  # a broken receive: nobody can be answered on this connection either
        logger.info("%s: the connection failed while the request waited", request.url.path)


async def primed_unless_disconnected(
    request: Request, events: AsyncGenerator[StreamEvent, None]
) -> AsyncIterator[StreamEvent]:
    """`primed(events)`, given up (and the request aborted) if the client leaves first."""
    return await unless_disconnected(request, primed(events), events.aclose)


async def collect_unless_disconnected(
    request: Request, events: AsyncGenerator[StreamEvent, None]
) -> list[StreamEvent]:
    """All events of a non-streamed request; if the client disconnects first, the request is
    cancelled (which aborts it in the engine) and ClientDisconnectedError is raised."""

    async def collect() -> list[StreamEvent]:
        return [event async for event in events]

    return await unless_disconnected(request, collect(), events.aclose)
