"""Turns the core's token updates into text: incremental detokenization, stop strings, `n`.

Used by the in-process engine and by the HTTP server's front alike. A request with `n > 1` runs
as `n` child sequences in the core (ids `"{request_id}/{i}"`); the group reports once all its
children are done.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ocula.engine.detokenizer import IncrementalDetokenizer
from ocula.engine.outputs import CompletionOutput, RequestOutput, TokenLogprob, TokenUpdate
from ocula.engine.request import FinishReason
from ocula.engine.stop_strings import StopStringMatcher
from ocula.sampling.params import SamplingParams

SEED_MODULUS = 2**64  # torch generators take seeds in [0, 2**64)


def child_request_id(request_id: str, index: int, n: int) -> str:
    return request_id if n == 1 else f"{request_id}/{index}"


def fan_out(request_id: str, params: SamplingParams) -> list[tuple[str, SamplingParams]]:
    """The core requests behind a request with `n` samples: ids `"{id}/{i}"` and, when seeded,
    seed + i (wrapped into the generator's range) so that the samples differ reproducibly. The
    prompt's logprobs, the same for all, are computed by the first child only."""
    if params.n == 1:
        return [(request_id, params)]
    children = []
    for index in range(params.n):
        child = params
        if params.seed is not None:
            child = dataclasses.replace(params, seed=(params.seed + index) % SEED_MODULUS)
        if index > 0 and params.prompt_logprobs is not None:
            child = dataclasses.replace(child, prompt_logprobs=None)
        children.append((child_request_id(request_id, index, params.n), child))
    return children


class SequenceStream:
    """Text state of one generated sequence.

    With `final_only` (a caller that reads the text once the sequence has finished, as the
    in-process engine does) and no stop strings to watch for, the tokens are detokenized in one
    decode at the end instead of one by one: `apply` returns "" until the last token."""

    def __init__(
        self,
        index: int,
        tokenizer: Any,
        prompt_ids: list[int],
        params: SamplingParams,
        final_only: bool = False,
    ) -> None:
        self.index = index
        self.params = params
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, params.skip_special_tokens)
        # Tokens whose text waits for the end (final_only), else None.
        self._text_ids: list[int] | None = [] if final_only and not params.stop else None
        self.stop_matcher = StopStringMatcher(params.stop or [], params.include_stop_str_in_output)
        self.token_ids: list[int] = []
        self.text = ""
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | list[int] | None = None
        self.num_cached_tokens = 0
        self.prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def apply(self, update: TokenUpdate) -> str:
        """Adds one token; returns the text that became final. Sets `finish_reason` when the
        sequence ended, including on a stop string (the caller then aborts it in the core)."""
        self.token_ids.append(update.token_id)
        self.num_cached_tokens = update.num_cached_tokens
        if update.prompt_logprobs is not None:
            self.prompt_logprobs = update.prompt_logprobs
        if self.logprobs is not None and update.logprob is not None:
            self.logprobs.append(
                TokenLogprob(update.token_id, update.logprob, update.top_logprobs or [])
            )
        # A token that stopped the sequence (EOS or a stop token id) is reported in the ids but,
        # like a stop string, its text is not part of the output unless asked for. The tokens of
        # a stop token sequence (a list stop_reason) keep their text, as in LightLLM.
        stop_reason = update.stop_reason
        stopped_by_token = update.finish_reason == FinishReason.STOP and not isinstance(
            stop_reason, list
        )
        keep_stop_text = self.params.include_stop_str_in_output or (
            self.params.print_eos_token and stop_reason is None  # EOS
        )
        new_text = ""
        if not stopped_by_token or keep_stop_text:
            if self._text_ids is not None:
                self._text_ids.append(update.token_id)
            else:
                new_text = self.detokenizer.push([update.token_id])
        if update.finish_reason is not None:
            if self._text_ids is not None:
                new_text = self.detokenizer.finish_with(self._text_ids)
            else:
                new_text += self.detokenizer.flush()
        # Like EOS and stop ids, stop strings only count once min_new_tokens exist; one that
        # started before that and ends after it counts (vLLM's look-back).
        may_stop = len(self.token_ids) > self.params.min_new_tokens
        emitted, stopped = self.stop_matcher.feed(new_text, may_stop)
        if stopped:
            self.finish_reason = FinishReason.STOP.value
            self.stop_reason = self.stop_matcher.matched_stop
        elif update.finish_reason is not None:
            emitted += self.stop_matcher.flush()
            self.finish_reason = FinishReason(update.finish_reason).value
            self.stop_reason = update.stop_reason
        self.text += emitted
        return emitted

    def abort(self) -> None:
        self.finish_reason = FinishReason.ABORT.value

    def completion(self) -> CompletionOutput:
        return CompletionOutput(
            self.index,
            self.text,
            list(self.token_ids),
            self.finish_reason,
            self.stop_reason,
            self.logprobs,
        )


@dataclass
class RequestGroup:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sequences: list[SequenceStream] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.sequences)

    def output(self) -> RequestOutput:
        return RequestOutput(
            self.request_id,
            self.prompt,
            self.prompt_token_ids,
            [s.completion() for s in self.sequences],
            self.finished,
            num_cached_tokens=max((s.num_cached_tokens for s in self.sequences), default=0),
            prompt_logprobs=next(
                (s.prompt_logprobs for s in self.sequences if s.prompt_logprobs is not None), None
            ),
        )
