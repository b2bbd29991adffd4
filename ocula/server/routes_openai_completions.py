"""POST /v1/completions: one prompt or a batch (strings or token ids), answered whole or streamed
as text_completion chunks. Choice `index` is `prompt_index * n + i`, as OpenAI numbers them."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request, Response

from ocula.engine.detokenizer import IncrementalDetokenizer
from ocula.engine.outputs import TokenLogprob
from ocula.server.async_engine import StreamEvent
from ocula.server.openai_logprobs import completion_logprobs, vllm_prompt_logprobs
from ocula.server.protocol_openai import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
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
    SSE_DONE,
    EventStreamResponse,
    events_by_choice,
    merge_streams,
    prompt_cached_tokens,
    sse,
    sse_error,
    start_generations,
    usage,
    whole_response,
)
from ocula.server.serving import close_stream, server_state
from ocula.server.text_encoding import check_token_budget

router = APIRouter()


@dataclass
class TokenizedPrompt:
    text: str | None  # as sent, when sent as a string
    token_ids: list[int]


def tokenize_prompts(
    tokenizer: Any, prompt: str | list[Any], max_tokens: int
) -> list[TokenizedPrompt]:
    """The request's prompts: a string, a list of token ids, or a batch of either. A string is
    tokenized with the tokenizer's special tokens (BOS), as a plain prompt should be; a huge one
    past `max_tokens` is refused first (`check_token_budget`)."""
    if isinstance(prompt, str):
        check_token_budget(tokenizer, prompt, max_tokens)
        return [TokenizedPrompt(prompt, tokenizer.encode(prompt, add_special_tokens=True))]
    if not prompt or isinstance(prompt[0], int):
        return [TokenizedPrompt(None, list(prompt))]
    batch = []
    for item in prompt:
        if isinstance(item, str):
            check_token_budget(tokenizer, item, max_tokens)
            batch.append(TokenizedPrompt(item, tokenizer.encode(item, add_special_tokens=True)))
        else:
            batch.append(TokenizedPrompt(None, list(item)))
    return batch


def check_unsupported(body: CompletionRequest) -> None:
    if body.suffix:
        raise OpenAIError(400, "suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise OpenAIError(400, "best_of other than n is not supported", param="best_of")
    if body.echo and body.logprobs is not None and body.stream:
        raise OpenAIError(
            400, "echo with logprobs is answered whole: send it without stream", param="echo"
        )
    if body.max_tokens == 0 and (not body.echo or body.stream):
        raise OpenAIError(
            400,
            "max_tokens must be at least 1; 0 (the prompt alone) needs echo, without stream",
            param="max_tokens",
        )


@router.post("/v1/completions")
@openai_endpoint
async def create_completion(request: Request) -> Response:
    state = server_state(request)
    body = await parse_body(request, CompletionRequest)
    model = check_model(state, body.model)
    stream_options = check_stream_options(body)
    check_unsupported(body)
    tokenizer = state.engine.tokenizer
    prompts = await asyncio.to_thread(
        tokenize_prompts, tokenizer, body.prompt, state.engine.max_prompt_tokens
    )
    sequences = len(prompts) * (body.n or 1)
    if sequences > state.max_in_flight:  # could never be admitted: not a 503 to retry
        state.metrics.requests.labels(status="rejected").inc()
        raise OpenAIError(
            400,
            f"a batch of {len(prompts)} prompts x n={body.n or 1} is {sequences} sequences, "
            f"more than this server holds at once ({state.max_in_flight}: "
            "--running_max_req_size + --max_waiting_requests)",
            param="prompt",
        )
    # max_tokens 0 with echo: the prompt scored, nothing generated (vLLM); one token is
    # generated and left out of the answer.
    echo_only = body.max_tokens == 0
    max_tokens = 1 if echo_only else body.max_tokens
    prepared = []
    for prompt in prompts:
        # max_tokens: 16 when left out (OpenAI), all the room left when sent as null (vLLM).
        max_new_tokens = resolve_max_tokens(state, max_tokens, len(prompt.token_ids), "prompt")
        params = sampling_params(body, max_new_tokens, body.logprobs)
        if body.echo and body.logprobs is not None:  # the echoed prompt's tokens need theirs
            wanted = max(body.logprobs, body.prompt_logprobs or 0)
            params = dataclasses.replace(params, prompt_logprobs=wanted)
        prepared.append(state.engine.prepare(prompt.token_ids, params))
    echoes = None
    if body.echo:
        echoes = [
            p.text
            if p.text is not None
            else tokenizer.decode(p.token_ids, skip_special_tokens=False)
            for p in prompts
        ]
    request_id = state.new_request_id("cmpl")
    generations = await start_generations(request, state, request_id, prepared)
    events = merge_streams(generations.streams)
    reply = CompletionReply(
        tokenizer,
        request_id,
        model,
        int(time.time()),
        [p.token_ids for p in prompts],
        prepared[0].params.n,
        body.logprobs,
        echoes,
        body.prompt_logprobs,
        echo_only,
    )
    if body.stream:
        include_usage = bool(stream_options.include_usage)
        return EventStreamResponse(reply.stream(events, include_usage), generations.close)
    return await whole_response(request, events, generations, reply.whole)


class CompletionReply:
    """Builds the response of one completions request (all its prompts) from its events."""

    def __init__(
        self,
        tokenizer: Any,
        request_id: str,
        model: str,
        created: int,
        prompt_token_ids: list[list[int]],
        n: int,
        logprobs: int | None,
        echoes: list[str] | None,
        prompt_logprobs: int | None = None,
        echo_only: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.request_id = request_id
        self.model = model
        self.created = created
        self.prompt_token_ids = prompt_token_ids
        self.prompt_lengths = [len(ids) for ids in prompt_token_ids]
        self.n = n
        self.logprobs_k = logprobs  # the legacy `logprobs`: alternatives per token
        self.with_logprobs = logprobs is not None
        self.echoes = echoes
        self.prompt_logprobs_k = prompt_logprobs  # vLLM's field, when asked for
        self.echo_only = echo_only  # max_tokens 0: the generated token is not part of it

    def echo(self, choice_index: int) -> str:
        return self.echoes[choice_index // self.n] if self.echoes is not None else ""

    def logprobs(self, events: list[StreamEvent], text_start: int) -> CompletionLogprobs:
        """Legacy logprobs of `events`; each token's offset is where the text it made final
        starts, counted from `text_start` in the choice's text."""
        items = [
            (e.token_id, e.logprob, e.top_logprobs, len(e.text))
            for e in events
            if e.logprob is not None
        ]
        return completion_logprobs(self.tokenizer, items, text_start)

    def echoed_logprobs(
        self, prompt_index: int, entries: list[TokenLogprob | None]
    ) -> CompletionLogprobs:
        """The echoed prompt's part of a choice's logprobs: each prompt token's, None for the
        first (nothing precedes it). Offsets follow the prompt's decoded text (special tokens
        left out, a character split over tokens placed with its last one)."""
        ids = self.prompt_token_ids[prompt_index]
        detokenizer = IncrementalDetokenizer(self.tokenizer, [], skip_special_tokens=True)
        advances = [len(detokenizer.push([token_id])) for token_id in ids]
        if advances:
            advances[-1] += len(detokenizer.flush())
        k = self.logprobs_k or 0
        items = [
            (token_id, e and e.logprob, e and e.top_logprobs[:k], advance)
            for token_id, e, advance in zip(ids, entries, advances, strict=True)
        ]
        return completion_logprobs(self.tokenizer, items, 0)

    def whole(self, collected: list[tuple[int, StreamEvent]]) -> Completion:
        scored = {i: e.prompt_logprobs for i, e in collected if e.prompt_logprobs is not None}
        echoed: dict[int, CompletionLogprobs] = {}  # per prompt, shared by its n choices
        vllm_scored: dict[int, Any] = {}
        choices = []
        for index, events in sorted(events_by_choice(collected, self.n).items()):
            prompt_index = index // self.n
            echo = self.echo(index)
            last = events[-1]
            kept = [] if self.echo_only else events
            logprobs = self.logprobs(kept, len(echo)) if self.with_logprobs else None
            entries = scored.get(prompt_index)
            if logprobs is not None and self.echoes is not None and entries is not None:
                if prompt_index not in echoed:
                    echoed[prompt_index] = self.echoed_logprobs(prompt_index, entries)
                prompt_part = echoed[prompt_index]
                logprobs = CompletionLogprobs(
                    **{
                        name: getattr(prompt_part, name) + getattr(logprobs, name)
                        for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset")
                    }
                )
            if self.prompt_logprobs_k is not None and prompt_index not in vllm_scored:
                vllm_scored[prompt_index] = vllm_prompt_logprobs(
                    self.tokenizer, entries, self.prompt_logprobs_k
                )
            choices.append(
                CompletionChoice(
                    index=index,
                    text=echo + "".join(e.text for e in kept),
                    logprobs=logprobs,
                    finish_reason="length" if self.echo_only else last.finish_reason,
                    stop_reason=None if self.echo_only else last.stop_reason,
                    prompt_logprobs=vllm_scored.get(prompt_index),
                )
            )
        completion_tokens = 0 if self.echo_only else len(collected)
        return Completion(
            id=self.request_id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=self.usage(completion_tokens, prompt_cached_tokens(collected)),
        )

    def usage(self, completion_tokens: int, cached_tokens: int) -> Usage:
        return usage(self.prompt_lengths, completion_tokens, cached_tokens)

    def chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        return sse(
            Completion(
                id=self.request_id,
                created=self.created,
                model=self.model,
                choices=choices,
                usage=usage,
            )
        )

    async def stream(
        self, events: AsyncGenerator[tuple[int, StreamEvent], None], include_usage: bool
    ) -> AsyncGenerator[str, None]:
        """Per choice: the echoed prompt (if asked), text chunks, then a chunk with
        `finish_reason`; with include_usage a last chunk with no choices; `[DONE]`."""
        text_lengths: dict[int, int] = {}
        completion_tokens = 0
        cached_by_prompt: dict[int, int] = {}
        try:
            if self.echoes is not None:
                for index in range(len(self.echoes) * self.n):
                    text_lengths[index] = len(self.echo(index))
                    yield self.chunk([CompletionChoice(index=index, text=self.echo(index))])
            async for prompt_index, event in events:
                completion_tokens += 1
                cached = max(cached_by_prompt.get(prompt_index, 0), event.num_cached_tokens)
                cached_by_prompt[prompt_index] = cached
                index = prompt_index * self.n + event.index
                start = text_lengths.get(index, 0)
                text_lengths[index] = start + len(event.text)
                logprobs = None
                if self.with_logprobs and event.logprob is not None:
                    logprobs = self.logprobs([event], start)
                if event.text or logprobs is not None:
                    choice = CompletionChoice(index=index, text=event.text, logprobs=logprobs)
                    yield self.chunk([choice])
                if event.finish_reason is not None:
                    choice = CompletionChoice(
                        index=index,
                        text="",
                        finish_reason=event.finish_reason,
                        stop_reason=event.stop_reason,
                    )
                    yield self.chunk([choice])
            if include_usage:
                cached_tokens = sum(cached_by_prompt.values())
                yield self.chunk([], self.usage(completion_tokens, cached_tokens))
            yield SSE_DONE
        except Exception as error:
            yield sse_error(error)
            yield SSE_DONE
        finally:
            await close_stream(events)
