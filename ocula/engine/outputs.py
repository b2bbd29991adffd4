"""What the engine reports: per-step token updates (core -> front) and finished outputs (API)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenUpdate:
    """One new token of one request, as the engine core reports it after a step."""

    request_id: str
    token_id: int
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None
    finish_reason: str | None  # a FinishReason value once the request stopped
    # The stop token id, stop string or stop token sequence (a list) that ended it.
    stop_reason: int | str | list[int] | None = None
    num_cached_tokens: int = 0
    queued_seconds: float | None = None  # on the first token: time from arrival to first step
    # On the first token of a request that asked for them: its prompt's logprobs (one entry per
    # prompt position, None for the first).
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    rank: int | None = None  # a prompt token's: 1 + how many tokens were likelier


@dataclass
class CompletionOutput:
    """One generated sequence (a request with `n > 1` has several)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: int | str | list[int] | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class RequestOutput:
    """The result of one prompt. `.text`, `.token_ids` and `.finish_reason` are those of the
    first completion, which is all there is unless `n > 1`."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    # With SamplingParams.prompt_logprobs: one entry per prompt token, None for the first.
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)
