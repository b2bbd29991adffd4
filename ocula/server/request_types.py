"""What the front's engine handle takes and gives: a prepared request, the events of its
sequences, and the error that says the engine is gone."""

from __future__ import annotations

from dataclasses import dataclass, field

from ocula.engine.outputs import TokenLogprob
from ocula.engine.request import ImageSpan
from ocula.sampling.params import SamplingParams


class EngineUnavailableError(RuntimeError):
    """The engine process is gone or failed; nothing can be served (HTTP 503). `error_type` is
    the `type` of the JSON error the client gets."""

    error_type = "engine_unavailable"


@dataclass
class PreparedRequest:
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams  # validated and resolved against the model's defaults
    images: list[ImageSpan] = field(default_factory=list)
    # The caller reads only each sequence's whole text (an answer sent at the end, without
    # per-token text or offsets): without stop strings, a sequence's text is then decoded once
    # when it finishes, and its events carry "" but the last, which carries all of it.
    text_at_end: bool = False


@dataclass
class StreamEvent:
    """One new token of sequence `index` of a request, with the text it made final."""

    index: int
    token_id: int
    text: str
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None
    finish_reason: str | None
    stop_reason: int | str | list[int] | None
    num_cached_tokens: int
    queued_seconds: float | None
    # On the first token of a sequence that asked for them: the prompt's logprobs.
    prompt_logprobs: list[TokenLogprob | None] | None = None
