"""POST /v1/completions: one prompt or a batch (strings or token ids), answered whole or streamed
as text_completion chunks. Choice `index` is `prompt_index * n + i`, as OpenAI numbers them."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request, Response

from ocula.sampling.param_checks import MAX_TOKEN_ID_ENTRIES, token_id_entries
from ocula.sampling.params import SamplingParams
from ocula.server.completion_reply import CompletionReply
from ocula.server.protocol_openai import (
    CompletionRequest,
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
    merge_streams,
    start_generations,
    whole_response,
)
from ocula.server.serving import prepare_admitted, server_state
from ocula.server.text_encoding import check_token_budget

router = APIRouter()


@dataclass
class TokenizedPrompt:
    text: str | None  # as sent, when sent as a string
    token_ids: list[int]


def tokenize_prompts(
    tokenizer: Any, prompt: str | list[Any], max_tokens: int, add_special_tokens: bool = True
) -> list[TokenizedPrompt]:
    """The request's prompts: a string, a list of token ids, or a batch of either. A string is
    tokenized with the tokenizer's special tokens (BOS) unless `add_special_tokens` is false; a
    huge one past `max_tokens` is refused first (`check_token_budget`)."""
    if isinstance(prompt, str):
        check_token_budget(tokenizer, prompt, max_tokens)
        return [
            TokenizedPrompt(prompt, tokenizer.encode(prompt, add_special_tokens=add_special_tokens))
        ]
    if not prompt or isinstance(prompt[0], int):
        return [TokenizedPrompt(None, list(prompt))]
    batch = []
    for item in prompt:
        if isinstance(item, str):
            check_token_budget(tokenizer, item, max_tokens)
            batch.append(
                TokenizedPrompt(item, tokenizer.encode(item, add_special_tokens=add_special_tokens))
            )
        else:
            batch.append(TokenizedPrompt(None, list(item)))
    return batch


def check_batch_token_ids(params: SamplingParams, num_prompts: int) -> None:
    """400 for a batch whose sequences would carry too many token ids to the engine in all
    (`MAX_TOKEN_ID_ENTRIES`; one prompt's n is checked with the other parameters)."""
    entries = num_prompts * params.n * token_id_entries(params)
    if entries > MAX_TOKEN_ID_ENTRIES:
        raise OpenAIError(
            400,
            f"{num_prompts} prompts x n={params.n} x {token_id_entries(params)} token ids "
            f"(allowed_token_ids, stop_token_ids, logit_bias) is {entries}, over the limit of "
            f"{MAX_TOKEN_ID_ENTRIES}",
            param="prompt",
        )


def check_unsupported(body: CompletionRequest) -> None:
    if body.suffix:
        raise OpenAIError(400, "suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise OpenAIError(400, "best_of other than n is not supported", param="best_of")
    if body.max_tokens == 0 and not body.echo:
        raise OpenAIError(
            400,
            "max_tokens must be at least 1; 0 (the prompt alone) needs echo",
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
    prompts = await prepare_admitted(
        request,
        state,
        body.n or 1,  # at least: each prompt runs n
        lambda: asyncio.to_thread(
            tokenize_prompts,
            tokenizer,
            body.prompt,
            state.engine.max_prompt_tokens,
            body.add_special_tokens is not False,
        ),
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
        check_batch_token_ids(params, len(prompts))
        if body.echo and body.logprobs is not None:  # the echoed prompt's tokens need theirs
            wanted = max(body.logprobs, body.prompt_logprobs or 0)
            params = dataclasses.replace(params, prompt_logprobs=wanted)
        # A whole answer without logprobs (whose offsets follow each token's text) reads
        # only the text.
        text_at_end = not body.stream and body.logprobs is None
        prepared.append(
            dataclasses.replace(
                state.engine.prepare(prompt.token_ids, params), text_at_end=text_at_end
            )
        )
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
        reply.continuous_usage = include_usage and bool(stream_options.continuous_usage_stats)
        return EventStreamResponse(reply.stream(events, include_usage), generations.close)
    return await whole_response(request, events, generations, reply.whole)
