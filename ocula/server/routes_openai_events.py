"""Starting a request's generations and delivering their events: every prompt admitted before
the first response byte, several prompts merged into one stream, and server-sent events whose
response aborts the request however it ends; and the usage and per-choice grouping of a
request's collected events."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from ocula.server.async_engine import (
    EngineUnavailableError,
    PreparedRequest,
    RequestError,
    StreamEvent,
)
from ocula.server.eager_streaming import EagerStreamingResponse, close_stream
from ocula.server.errors import OverloadedError
from ocula.server.protocol_openai import PromptTokensDetails, Usage
from ocula.server.routes_openai_common import OpenAIError
from ocula.server.serving import (
    ServerState,
    collect_unless_disconnected,
    primed,
    run_request,
    unless_disconnected,
)

logger = logging.getLogger(__name__)


class Generations:
    """The running generations of one request's prompts. `streams` yield their events, the
    first of each already arrived; `close()` aborts whatever still runs. Closing here does not
    depend on `streams` ever having been read: an async generator that never started ignores
    `aclose()`, so the started generators underneath are the ones closed."""

    def __init__(
        self,
        started: list[AsyncGenerator[StreamEvent, None]],
        streams: list[AsyncIterator[StreamEvent]],
    ) -> None:
        self._started = started
        self.streams = streams

    async def close(self) -> None:
        """Idempotent; call once nothing reads `streams` any more."""
        for events in self._started:
            await events.aclose()


async def start_generations(
    request: Request, state: ServerState, request_id: str, prepared: list[PreparedRequest]
) -> Generations:
    """Submits every prompt (ids `request_id`, or `request_id-i` for several) and waits for each
    one's first token, so that refusals (overload, engine errors) surface before any response
    byte. On failure, or if the client leaves first (ClientDisconnectedError), every prompt
    already started is aborted and the first error is raised."""
    ids = (
        [request_id] if len(prepared) == 1 else [f"{request_id}-{i}" for i in range(len(prepared))]
    )
    started = [run_request(state, sub_id, p) for sub_id, p in zip(ids, prepared, strict=True)]
    generations = Generations(started, [])
    try:
        results = await unless_disconnected(
            request,
            asyncio.gather(*(primed(events) for events in started), return_exceptions=True),
            generations.close,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
    except BaseException:
        await generations.close()
        raise
    generations.streams = list(results)
    return generations


async def merge_streams(
    streams: list[AsyncIterator[StreamEvent]],
) -> AsyncGenerator[tuple[int, StreamEvent], None]:
    """The events of several prompts as they come, tagged with the prompt's index. Closing the
    merged stream (or an error in one) aborts whatever still runs."""
    if len(streams) == 1:
        try:
            async for event in streams[0]:
                yield 0, event
        finally:
            await close_stream(streams[0])
        return
    queue: asyncio.Queue[tuple[int, StreamEvent | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[StreamEvent]) -> None:
        try:
            async for event in stream:
                queue.put_nowait((index, event))
            queue.put_nowait((index, None))
        except Exception as error:
            queue.put_nowait((index, error))
        finally:
            await close_stream(stream)

    tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def sse(payload: BaseModel | dict[str, Any]) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def sse_error(error: Exception) -> str:
    """The last event of a stream that failed after its headers were sent."""
    if isinstance(error, RequestError):
        return sse(OpenAIError(400, str(error)).body())
    if isinstance(error, EngineUnavailableError):  # engine dead, or stopped by a shutdown
        return sse(OpenAIError(503, str(error), error_type=error.error_type).body())
    if isinstance(error, OverloadedError):
        return sse(OpenAIError(503, str(error), error_type="overloaded").body())
    logger.exception("error while streaming", exc_info=error)
    internal = f"internal error: {type(error).__name__}"
    return sse(OpenAIError(500, internal, error_type="internal_error").body())


class EventStreamResponse(EagerStreamingResponse):
    """A server-sent-events response that runs `on_close` however the response ends (finished,
    client gone, server stopping), so that the request is aborted in the engine and its KV freed
    at once rather than whenever its generators are garbage-collected."""

    def __init__(
        self, body: AsyncGenerator[str, None], on_close: Callable[[], Awaitable[None]]
    ) -> None:
        super().__init__(
            body,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._body = body
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._body.aclose()
            await self._on_close()


async def whole_response(
    request: Request,
    events: AsyncIterator[tuple[int, StreamEvent]],
    generations: Generations,
    build: Callable[[list[tuple[int, StreamEvent]]], BaseModel],
) -> JSONResponse:
    """A non-streamed answer: every event (aborting if the client leaves), then `build`'s body.
    The generations are closed whatever happens."""
    try:
        collected = await collect_unless_disconnected(request, events)
    finally:
        await generations.close()
    if any(event.prompt_logprobs for _, event in collected):
        # A prompt's logprobs are thousands of entries to decode and build: off the event loop.
        body = await asyncio.to_thread(lambda: build(collected).model_dump(mode="json"))
        return JSONResponse(body)
    return JSONResponse(build(collected).model_dump(mode="json"))


def usage(prompt_lengths: list[int], completion_tokens: int, cached_tokens: int) -> Usage:
    prompt_tokens = sum(prompt_lengths)
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
    )


def events_by_choice(
    collected: list[tuple[int, StreamEvent]], choices_per_prompt: int
) -> dict[int, list[StreamEvent]]:
    """Events of a finished request by choice index: `prompt_index * n + sequence_index`, as
    OpenAI numbers the choices of a batch of prompts."""
    choices: dict[int, list[StreamEvent]] = {}
    for prompt_index, event in collected:
        choices.setdefault(prompt_index * choices_per_prompt + event.index, []).append(event)
    return choices


def prompt_cached_tokens(collected: list[tuple[int, StreamEvent]]) -> int:
    """Prompt tokens found in the prefix cache, counted once per prompt."""
    per_prompt: dict[int, int] = {}
    for prompt_index, event in collected:
        per_prompt[prompt_index] = max(per_prompt.get(prompt_index, 0), event.num_cached_tokens)
    return sum(per_prompt.values())


class OpenAIReply:
    """What the chat and completions answers share: their identity, and stream chunks of
    `chunk_model` that carry the usage so far when vLLM's `continuous_usage_stats` asked for it
    (`track_usage` keeps it current)."""

    chunk_model: type[BaseModel]

    def __init__(self, tokenizer: Any, request_id: str, model: str, created: int) -> None:
        self.tokenizer = tokenizer
        self.request_id = request_id
        self.model = model
        self.created = created
        self.continuous_usage = False
        self._usage_so_far: Usage | None = None

    def usage(self, completion_tokens: int, cached_tokens: int) -> Usage:
        raise NotImplementedError

    def track_usage(self, completion_tokens: int, cached_tokens: int) -> None:
        if self.continuous_usage:
            self._usage_so_far = self.usage(completion_tokens, cached_tokens)

    def chunk(self, choices: list[Any], usage: Usage | None = None) -> str:
        """One SSE chunk; a chunk with choices also holds the usage so far when tracked."""
        return sse(
            self.chunk_model(
                id=self.request_id,
                created=self.created,
                model=self.model,
                choices=choices,
                usage=usage or (self._usage_so_far if choices else None),
            )
        )

    async def framed(
        self, chunks: AsyncGenerator[str, None], events: AsyncGenerator[Any, None]
    ) -> AsyncGenerator[str, None]:
        """`chunks`, then `[DONE]`; an error after the first byte ends the stream with an error
        event and `[DONE]`. The chunks and the request's events are closed however it ends."""
        try:
            async for chunk in chunks:
                yield chunk
            yield SSE_DONE
        except Exception as error:
            yield sse_error(error)
            yield SSE_DONE
        finally:
            await chunks.aclose()
            await close_stream(events)
