"""LightLLM's response bodies: `/generate`'s JSON (with `return_details` tokens and the prompt
logprobs of --return_all_prompt_logprobs) and `/generate_stream`'s server-sent events."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

from ocula.server.async_engine import (
    EngineUnavailableError,
    PreparedRequest,
    RequestError,
    StreamEvent,
)
from ocula.server.protocol_lightllm import GeneratedTokenDetail, StreamChunk, TokenDetail

logger = logging.getLogger(__name__)


class DetailWriter:
    """Builds `TokenDetail`s of one request, counting output tokens per sequence."""

    def __init__(self, tokenizer: Any, prompt_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.prompt_tokens = prompt_tokens
        self.special_ids = frozenset(tokenizer.all_special_ids)
        self.counts: dict[int, int] = defaultdict(int)
        self.logprob_sums: dict[int, float] = defaultdict(float)

    def detail(self, event: StreamEvent) -> TokenDetail:
        self.counts[event.index] += 1
        return TokenDetail(
            id=event.token_id,
            text=event.text,
            logprob=event.logprob,
            special=event.token_id in self.special_ids,
            count_output_tokens=self.counts[event.index],
            prompt_tokens=self.prompt_tokens,
        )

    def generated_detail(self, event: StreamEvent) -> GeneratedTokenDetail:
        base = self.detail(event)
        mean = None
        if event.logprob is not None:
            self.logprob_sums[event.index] += event.logprob
            mean = self.logprob_sums[event.index] / base.count_output_tokens
        return GeneratedTokenDetail(
            **base.model_dump(), cumlogprob=mean, prompt_cache_len=event.num_cached_tokens
        )


def generate_response(
    events: list[StreamEvent], prepared: PreparedRequest, tokenizer: Any, details: bool
) -> dict[str, Any]:
    """LightLLM's /generate body. `generated_text` is always a list (one per sequence);
    `count_output_tokens`, `finish_reason` and `tokens` are lists per sequence only when n > 1.
    With --return_all_prompt_logprobs, `prompt_token_ids` and `prompt_logprobs` ([token i,
    {token i + 1: its logprob}] for each position but the last)."""
    num_sequences = prepared.params.n
    by_sequence: list[list[StreamEvent]] = [[] for _ in range(num_sequences)]
    for event in events:
        by_sequence[event.index].append(event)
    texts = ["".join(e.text for e in seq) for seq in by_sequence]
    counts = [len(seq) for seq in by_sequence]
    reasons = [seq[-1].finish_reason if seq else None for seq in by_sequence]
    single = num_sequences == 1
    body: dict[str, Any] = {
        "generated_text": texts,
        "count_output_tokens": counts[0] if single else counts,
        "finish_reason": reasons[0] if single else reasons,
        "prompt_tokens": len(prepared.prompt_token_ids),
    }
    scored = next((e.prompt_logprobs for e in events if e.prompt_logprobs is not None), None)
    if scored is not None:  # --return_all_prompt_logprobs, in LightLLM's shape
        ids = prepared.prompt_token_ids
        body["prompt_token_ids"] = list(ids)
        body["prompt_logprobs"] = [
            [ids[i], {entry.token_id: entry.logprob}]
            for i, entry in enumerate(scored[1:])
            if entry is not None
        ]
    if details:
        writer = DetailWriter(tokenizer, len(prepared.prompt_token_ids))
        tokens = [[writer.generated_detail(e).model_dump() for e in seq] for seq in by_sequence]
        body["tokens"] = tokens[0] if single else tokens
    return body


def sse_event(payload: str) -> bytes:
    """LightLLM's framing: `data:` with no space, the JSON, a blank line."""
    return f"data:{payload}\n\n".encode()


async def stream_events(
    events: AsyncIterator[StreamEvent], writer: DetailWriter
) -> AsyncIterator[bytes]:
    """One SSE event per generated token. An error after the first byte cannot change the status
    any more: it is sent as a last event `{"error": {"message", "type", "code"}}`."""
    try:
        async for event in events:
            chunk = StreamChunk(
                token=writer.detail(event),
                finished=event.finish_reason is not None,
                finish_reason=event.finish_reason,
            )
            yield sse_event(chunk.model_dump_json())
    except (RequestError, EngineUnavailableError) as error:
        logger.warning("stream ended by an error: %s", error)
        if isinstance(error, RequestError):
            code, error_type = 400, "invalid_request_error"
        else:  # the engine died, or the server stopped the request while shutting down
            code, error_type = 503, error.error_type
        error_body = {"message": str(error), "type": error_type, "code": code}
        yield sse_event(json.dumps({"error": error_body}, separators=(",", ":")))
    finally:
        await events.aclose()
