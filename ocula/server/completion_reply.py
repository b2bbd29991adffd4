"""The body of a /v1/completions answer, whole or streamed as text_completion chunks, built from
the request's events: echoed prompts, legacy logprobs (the prompt's too, when scored), vLLM's
`prompt_logprobs`, usage."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from ocula.engine.detokenizer import IncrementalDetokenizer
from ocula.engine.outputs import TokenLogprob
from ocula.server.async_engine import StreamEvent
from ocula.server.openai_logprobs import completion_logprobs, vllm_prompt_logprobs
from ocula.server.protocol_openai import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    Usage,
)
from ocula.server.routes_openai_events import (
    OpenAIReply,
    events_by_choice,
    prompt_cached_tokens,
    usage,
)


class CompletionReply(OpenAIReply):
    """Builds the response of one completions request (all its prompts) from its events."""

    chunk_model = Completion

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
        super().__init__(tokenizer, request_id, model, created)
        self.prompt_token_ids = prompt_token_ids
        self.prompt_lengths = [len(ids) for ids in prompt_token_ids]
        self.n = n
        self.logprobs_k = logprobs  # the legacy `logprobs`: alternatives per token
        self.with_logprobs = logprobs is not None
        self.echoes = echoes
        self.prompt_logprobs_k = prompt_logprobs  # vLLM's field, when asked for
        self.echo_only = echo_only  # max_tokens 0: the generated token is not part of it
        # What a stream has sent so far: each choice's text length, the prompts echoed, the
        # completion tokens and the cached prompt tokens by prompt.
        self.text_lengths: dict[int, int] = {}
        self.echoed: set[int] = set()
        self.completion_tokens = 0
        self.cached_by_prompt: dict[int, int] = {}

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
        first (nothing precedes it). Offsets follow the prompt's decoded text as echoed (special
        tokens kept, a character split over tokens placed with its last one)."""
        ids = self.prompt_token_ids[prompt_index]
        detokenizer = IncrementalDetokenizer(self.tokenizer, [], skip_special_tokens=False)
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

    def stream(
        self, events: AsyncGenerator[tuple[int, StreamEvent], None], include_usage: bool
    ) -> AsyncGenerator[str, None]:
        """Per choice: the echoed prompt (if asked; with logprobs, once the prompt's arrive with
        its first token, and carrying them), text chunks, then a chunk with `finish_reason`;
        with include_usage a last chunk with no choices (with continuous_usage_stats, every
        chunk also holds the usage so far); `[DONE]`. With max_tokens 0 the echo is all the
        text, finished by "length"."""
        return self.framed(self._chunks(events, include_usage), events)

    async def _chunks(
        self, events: AsyncGenerator[tuple[int, StreamEvent], None], include_usage: bool
    ) -> AsyncGenerator[str, None]:
        self.track_usage(0, 0)
        # Echoes that carry the prompt's logprobs wait for them (on the first token of a
        # prompt's first choice); that prompt's other events wait behind its echo.
        scored_echoes = self.echoes is not None and self.with_logprobs
        if self.echoes is not None and not scored_echoes:
            for prompt_index in range(len(self.echoes)):
                for chunk in self.echo_chunks(prompt_index, None):
                    yield chunk
        held: dict[int, list[StreamEvent]] = {}
        async for prompt_index, event in events:
            ready = [event]
            if scored_echoes and prompt_index not in self.echoed:
                if event.prompt_logprobs is None:
                    held.setdefault(prompt_index, []).append(event)
                    continue
                scored = self.echoed_logprobs(prompt_index, event.prompt_logprobs)
                for chunk in self.echo_chunks(prompt_index, scored):
                    yield chunk
                ready = [*held.pop(prompt_index, []), event]
            for ready_event in ready:
                for chunk in self.event_chunks(prompt_index, ready_event):
                    yield chunk
        for prompt_index, waiting in held.items():  # its prompt's logprobs never came
            for chunk in self.echo_chunks(prompt_index, None):
                yield chunk
            for event in waiting:
                for chunk in self.event_chunks(prompt_index, event):
                    yield chunk
        if include_usage:
            cached_tokens = sum(self.cached_by_prompt.values())
            yield self.chunk([], self.usage(self.completion_tokens, cached_tokens))

    def echo_chunks(self, prompt_index: int, scored: CompletionLogprobs | None) -> list[str]:
        """The echo chunk of each choice of a prompt, with the prompt's logprobs if scored."""
        self.echoed.add(prompt_index)
        chunks = []
        for index in range(prompt_index * self.n, (prompt_index + 1) * self.n):
            echo = self.echo(index)
            self.text_lengths[index] = len(echo)
            chunks.append(self.chunk([CompletionChoice(index=index, text=echo, logprobs=scored)]))
        return chunks

    def event_chunks(self, prompt_index: int, event: StreamEvent) -> list[str]:
        """A token's chunk (its text and logprobs), and the finishing chunk if it is the last;
        with max_tokens 0, only the finish (the generated token is not part of the answer)."""
        index = prompt_index * self.n + event.index
        if not self.echo_only:
            self.completion_tokens += 1
        cached = max(self.cached_by_prompt.get(prompt_index, 0), event.num_cached_tokens)
        self.cached_by_prompt[prompt_index] = cached
        self.track_usage(self.completion_tokens, sum(self.cached_by_prompt.values()))
        chunks = []
        start = self.text_lengths.get(index, 0)
        if not self.echo_only:
            self.text_lengths[index] = start + len(event.text)
            logprobs = None
            if self.with_logprobs and event.logprob is not None:
                logprobs = self.logprobs([event], start)
            if event.text or logprobs is not None:
                chunks.append(
                    self.chunk([CompletionChoice(index=index, text=event.text, logprobs=logprobs)])
                )
        if event.finish_reason is not None:
            choice = CompletionChoice(
                index=index,
                text="",
                finish_reason="length" if self.echo_only else event.finish_reason,
                stop_reason=None if self.echo_only else event.stop_reason,
            )
            chunks.append(self.chunk([choice]))
        return chunks
