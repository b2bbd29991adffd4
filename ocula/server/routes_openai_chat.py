"""POST /v1/chat/completions: messages through the tokenizer's chat template, then generation,
answered whole or streamed as chat.completion.chunk events."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import APIRouter, Request, Response

from ocula.multimodal.image_processing import MAX_REQUEST_TILES
from ocula.server.async_engine import StreamEvent
from ocula.server.chat_messages import render_chat_prompt
from ocula.server.openai_logprobs import top_alternatives, top_logprob, vllm_prompt_logprobs
from ocula.server.protocol_openai import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatLogprobs,
    Delta,
    TokenLogprobEntry,
    Usage,
)
from ocula.server.routes_openai_common import (
    OpenAIError,
    check_model,
    check_stream_options,
    openai_endpoint,
    parse_body,
    resolve_max_tokens,
    sampling_params,
)
from ocula.server.routes_openai_events import (
    EventStreamResponse,
    OpenAIReply,
    events_by_choice,
    merge_streams,
    prompt_cached_tokens,
    start_generations,
    usage,
    whole_response,
)
from ocula.server.serving import ServerState, prepare_admitted, server_state
from ocula.server.text_encoding import check_token_budget_off_loop, encode_text

router = APIRouter()


async def tokenize_chat(state: ServerState, body: ChatCompletionRequest) -> tuple[list[int], list]:
    """Token ids of the conversation, with images expanded, and the image spans. Templates
    write their own special tokens (BOS included), so none are added unless the request's
    `add_special_tokens` says so."""
    for name in ("chat_template", "echo"):
        if getattr(body, name):
            raise OpenAIError(400, f"{name} is not supported on this route", param=name)
    add_special_tokens = bool(body.add_special_tokens)
    max_tiles = max_tiles_of(body)
    engine = state.engine
    text, sources = await asyncio.to_thread(render_chat_prompt, engine.tokenizer, body)
    if not sources:
        budget = engine.max_prompt_tokens
        return await encode_text(engine.tokenizer, text, add_special_tokens, budget), []
    reason = engine.image_support_error()
    if reason is not None:
        raise OpenAIError(400, f"messages: {reason}", param="messages")
    assert engine.images is not None
    await check_token_budget_off_loop(engine.tokenizer, text, engine.max_prompt_tokens)
    try:
        return await engine.images.tokenize(text, sources, max_tiles, add_special_tokens)
    except ValueError as error:
        raise OpenAIError(400, f"messages: {error}", param="messages") from None


def max_tiles_of(fields: ChatCompletionRequest) -> int | None:
    """The tile cap per image that `mm_processor_kwargs` asks for (None: the server's)."""
    kwargs = dict(fields.mm_processor_kwargs or {})
    tiles = kwargs.pop("max_dynamic_patch", None)
    if kwargs:
        raise OpenAIError(
            400,
            f"mm_processor_kwargs: {', '.join(map(repr, kwargs))} not supported; this server "
            "takes max_dynamic_patch (the tile cap per image) only",
            param="mm_processor_kwargs",
        )
    if tiles is None:
        return None
    if isinstance(tiles, bool) or not isinstance(tiles, int) or not 1 <= tiles <= MAX_REQUEST_TILES:
        raise OpenAIError(
            400,
            f"mm_processor_kwargs.max_dynamic_patch must be an integer in [1, "
            f"{MAX_REQUEST_TILES}], got {tiles!r}",
            param="mm_processor_kwargs",
        )
    return tiles


def logprob_entry(tokenizer: Any, event: StreamEvent) -> TokenLogprobEntry:
    sampled = top_logprob(tokenizer, event.token_id, event.logprob or 0.0)
    alternatives = top_alternatives(tokenizer, event.top_logprobs)
    return TokenLogprobEntry(**sampled.model_dump(), top_logprobs=alternatives)


@router.post("/v1/chat/completions")
@openai_endpoint
async def create_chat_completion(request: Request) -> Response:
    state = server_state(request)
    body = await parse_body(request, ChatCompletionRequest)
    model = check_model(state, body.model)
    stream_options = check_stream_options(body)
    if body.top_logprobs and not body.logprobs:
        raise OpenAIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    tokenizer = state.engine.tokenizer
    prompt_ids, images = await prepare_admitted(
        request, state, body.n or 1, lambda: tokenize_chat(state, body)
    )
    if body.max_completion_tokens is not None:
        requested, field = body.max_completion_tokens, "max_completion_tokens"
    else:
        requested, field = body.max_tokens, "max_tokens"
    max_new_tokens = resolve_max_tokens(state, requested, len(prompt_ids), "messages", field)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling_params(body, max_new_tokens, logprobs)
    prepared = state.engine.prepare(prompt_ids, params, images)
    if not body.stream:  # the answer's message is the whole text (logprobs name tokens)
        prepared = dataclasses.replace(prepared, text_at_end=True)
    request_id = state.new_request_id("chatcmpl")
    generations = await start_generations(request, state, request_id, [prepared])
    events = merge_streams(generations.streams)
    created = int(time.time())
    reply = ChatReply(tokenizer, request_id, model, created, len(prompt_ids), logprobs)
    reply.prompt_logprobs_k = body.prompt_logprobs
    if body.stream:
        n, include_usage = prepared.params.n, bool(stream_options.include_usage)
        reply.continuous_usage = include_usage and bool(stream_options.continuous_usage_stats)
        return EventStreamResponse(reply.stream(events, n, include_usage), generations.close)
    return await whole_response(request, events, generations, reply.whole)


class ChatReply(OpenAIReply):
    """Builds the response of one chat request from its events."""

    chunk_model = ChatCompletionChunk

    def __init__(
        self,
        tokenizer: Any,
        request_id: str,
        model: str,
        created: int,
        prompt_len: int,
        logprobs: int | None,
    ) -> None:
        super().__init__(tokenizer, request_id, model, created)
        self.prompt_len = prompt_len
        self.with_logprobs = logprobs is not None
        self.prompt_logprobs_k = 0  # vLLM's `prompt_logprobs`: alternatives per prompt token

    def usage(self, completion_tokens: int, cached_tokens: int) -> Usage:
        return usage([self.prompt_len], completion_tokens, cached_tokens)

    def whole(self, collected: list[tuple[int, StreamEvent]]) -> ChatCompletion:
        choices = []
        for index, events in sorted(events_by_choice(collected, 1).items()):
            logprobs = None
            if self.with_logprobs:
                entries = [
                    logprob_entry(self.tokenizer, e) for e in events if e.logprob is not None
                ]
                logprobs = ChatLogprobs(content=entries)
            last = events[-1]
            choices.append(
                ChatChoice(
                    index=index,
                    message=AssistantMessage(content="".join(e.text for e in events)),
                    logprobs=logprobs,
                    finish_reason=last.finish_reason,
                    stop_reason=last.stop_reason,
                )
            )
        scored = next((e.prompt_logprobs for _, e in collected if e.prompt_logprobs), None)
        return ChatCompletion(
            id=self.request_id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=self.usage(len(collected), prompt_cached_tokens(collected)),
            prompt_logprobs=vllm_prompt_logprobs(self.tokenizer, scored, self.prompt_logprobs_k),
        )

    def stream(
        self, events: AsyncGenerator[tuple[int, StreamEvent], None], n: int, include_usage: bool
    ) -> AsyncGenerator[str, None]:
        """Per choice: a role chunk, content chunks, then a chunk with `finish_reason` and an
        empty delta; with include_usage a last chunk with no choices and the usage (with
        continuous_usage_stats, every chunk also holds the usage so far); `[DONE]`."""
        return self.framed(self._chunks(events, n, include_usage), events)

    async def _chunks(
        self, events: AsyncGenerator[tuple[int, StreamEvent], None], n: int, include_usage: bool
    ) -> AsyncGenerator[str, None]:
        completion_tokens = 0
        cached_tokens = 0
        self.track_usage(0, 0)
        for index in range(n):
            role = Delta(role="assistant", content="")
            yield self.chunk([ChatChunkChoice(index=index, delta=role)])
        async for _, event in events:
            completion_tokens += 1
            cached_tokens = max(cached_tokens, event.num_cached_tokens)
            self.track_usage(completion_tokens, cached_tokens)
            logprobs = None
            if self.with_logprobs and event.logprob is not None:
                logprobs = ChatLogprobs(content=[logprob_entry(self.tokenizer, event)])
            if event.text or logprobs is not None:
                delta = Delta(content=event.text)
                choice = ChatChunkChoice(index=event.index, delta=delta, logprobs=logprobs)
                yield self.chunk([choice])
            if event.finish_reason is not None:
                choice = ChatChunkChoice(
                    index=event.index,
                    delta=Delta(),
                    finish_reason=event.finish_reason,
                    stop_reason=event.stop_reason,
                )
                yield self.chunk([choice])
        if include_usage:
            yield self.chunk([], self.usage(completion_tokens, cached_tokens))
