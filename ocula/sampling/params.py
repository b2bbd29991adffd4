"""The options a user gives for one request: how many tokens, how to sample them, when to stop.

`SamplingParams` is a plain dataclass (no torch) shared by the offline API and the HTTP server,
which maps LightLLM/OpenAI parameters onto it. The five sampling knobs `temperature`, `top_p`,
`top_k`, `min_p` and `repetition_penalty` default to None, meaning "not set by the user": the
engine resolves them once per request with `with_model_defaults` (the model's
generation_config.json first, then the global fallbacks below). The sampler only ever sees
resolved values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Global fallbacks for knobs neither the user nor the model's generation config set.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0
DEFAULT_TOP_K = -1  # off
DEFAULT_MIN_P = 0.0  # off
DEFAULT_REPETITION_PENALTY = 1.0  # off

MAX_LOGPROBS = 20
# All stop strings of a request together, in characters: far above any real use, and it bounds
# the matcher's tables (`engine/stop_strings.py`).
MAX_STOP_CHARS = 16384
# Stop strings per request (OpenAI takes 4): each one costs the matcher work per output character.
MAX_STOP_STRINGS = 64
FLOAT32_MAX = 3.4028234663852886e38
# Far beyond use (penalties near 1), and it keeps a logit of 1e4 finite in float32 either way.
REPETITION_PENALTY_RANGE = (1e-6, 1e6)
# OpenAI's lower bound; no upper one in LightLLM, and 1e6 x any count stays finite in float32
# (the OpenAI routes keep OpenAI's [-2, 2]).
PRESENCE_FREQUENCY_RANGE = (-2.0, 1e6)
# OpenAI's bounds: a bias of -100 or 100 in effect bans or forces its token.
LOGIT_BIAS_LIMIT = 100.0
MAX_LOGIT_BIAS_TOKENS = 1024
# Cap of the EOS logit's relative gain under exponential_decay_length_penalty: it keeps a
# factor > 1 far into a long output from overflowing float32 (the EOS is then certain anyway).
MAX_EOS_DECAY_GAIN = 1e6
# Each row's allowed ids are copied to the device every step.
MAX_ALLOWED_TOKEN_IDS = 16384
# Which tokens the penalties count (see SamplingParams).
PENALTY_SCOPES = ("vllm", "output", "prompt_and_output")
_SEED_MIN = -(2**63)  # torch.Generator.manual_seed accepts [-2**63, 2**64 - 1]
_SEED_MAX = 2**64 - 1


@dataclass
class SamplingParams:
    """Per-request generation options.

    Conventions (vLLM's where the two projects differ):
    - `temperature == 0` means greedy decoding; top_k/top_p/min_p are then ignored.
    - `top_k` of -1 or 0 means no top-k filter.
    - `logprobs = None` returns no logprobs; `logprobs = k` returns the logprob of each sampled
      token plus the k most likely alternatives (k = 0: the sampled token only).
    - `min_new_tokens`: EOS and `stop_token_ids` cannot be sampled before that many new tokens.
    - `stop` strings are checked on the detokenized text by the front end; `stop_token_ids`,
      `stop_token_sequences` and EOS (unless `ignore_eos`) by the engine.
    - `stop_token_sequences` (LightLLM's `stop_sequences`): the sequence stops once its output
      ends with one of these runs of ids; unlike a stop token id's, their text stays in the output.
    - `penalty_scope`, which tokens the penalties count: "vllm" (vLLM's and OpenAI's) the
      repetition penalty the prompt's and the output's, presence and frequency the output's;
      "output" all three the output's only (LightLLM's default); "prompt_and_output" all three
      both (LightLLM's `input_penalty`).
    - `allowed_token_ids`, when not empty, are the only tokens that can be sampled.
    - `exponential_decay_length_penalty` (start, factor), transformers' and LightLLM's: once
      the output holds n > start tokens, each EOS logit gains |logit| * (factor^(n - start) - 1)
      (the gain capped at MAX_EOS_DECAY_GAIN), after the penalties.
    - `logit_bias` {token id: bias in [-100, 100]} is added to the logits before sampling,
      before the penalties (vLLM's order) and the bans of `min_new_tokens`; logprobs stay those
      of the model.
    """

    n: int = 1
    max_new_tokens: int = 16
    min_new_tokens: int = 0
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    stop_token_sequences: list[list[int]] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    penalty_scope: str = "vllm"
    allowed_token_ids: list[int] = field(default_factory=list)  # empty: any token
    exponential_decay_length_penalty: tuple[int, float] | None = None  # (start, factor)

    def __post_init__(self) -> None:
        # OpenAI accepts a single stop string; store every form as a list.
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if self.stop_token_sequences is None:
            self.stop_token_sequences = []
        if self.allowed_token_ids is None:
            self.allowed_token_ids = []
        if self.logit_bias is None:
            self.logit_bias = {}

    @property
    def is_greedy(self) -> bool:
        """True when the (resolved) temperature asks for argmax decoding."""
        return self.temperature == 0

    def validate(self, vocab_size: int | None = None) -> None:
        """Raises ValueError naming the first field that is out of range.

        Unresolved knobs (None) are accepted; resolved values are checked. With `vocab_size`,
        the token ids of `logit_bias` must be below it.
        """
        _check_int("n", self.n)
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        _check_int("max_new_tokens", self.max_new_tokens)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        _check_int("min_new_tokens", self.min_new_tokens)
        if self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be at least 0, got {self.min_new_tokens}")
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens ({self.min_new_tokens}) must not exceed "
                f"max_new_tokens ({self.max_new_tokens})"
            )
        if self.temperature is not None:
            _check_number("temperature", self.temperature)
            if self.temperature < 0:
                raise ValueError(f"temperature must be at least 0, got {self.temperature}")
        if self.top_p is not None:
            _check_number("top_p", self.top_p)
            if not 0 < self.top_p <= 1:
                raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None:
            _check_int("top_k", self.top_k)
            if self.top_k < -1:
                raise ValueError(f"top_k must be -1 or 0 (off) or at least 1, got {self.top_k}")
        if self.min_p is not None:
            _check_number("min_p", self.min_p)
            if not 0 <= self.min_p <= 1:
                raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty is not None:
            _check_number("repetition_penalty", self.repetition_penalty)
            low, high = REPETITION_PENALTY_RANGE
            if not low <= self.repetition_penalty <= high:
                raise ValueError(
                    f"repetition_penalty must be in [{low:g}, {high:g}], "
                    f"got {self.repetition_penalty}"
                )
        low, high = PRESENCE_FREQUENCY_RANGE
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check_number(name, value)
            if not low <= value <= high:
                raise ValueError(f"{name} must be in [{low:g}, {high:g}], got {value}")
        if self.seed is not None:
            _check_int("seed", self.seed)
            if not _SEED_MIN <= self.seed <= _SEED_MAX:
                raise ValueError(f"seed must be in [-2**63, 2**64 - 1], got {self.seed}")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs)
            if not 0 <= self.logprobs <= MAX_LOGPROBS:
                raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
        if any(s == "" for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(
                f"stop holds {len(self.stop)} strings; at most {MAX_STOP_STRINGS} are allowed"
            )
        if sum(len(s) for s in self.stop) > MAX_STOP_CHARS:
            raise ValueError(
                f"stop strings may hold {MAX_STOP_CHARS} characters in all, "
                f"got {sum(len(s) for s in self.stop)}"
            )
        for token_id in self.stop_token_ids:
            _check_int("stop_token_ids", token_id)
            if token_id < 0:
                raise ValueError(f"stop_token_ids must be non-negative, got {token_id}")
        self._validate_stop_token_sequences(vocab_size)
        self._validate_logit_bias(vocab_size)
        self._validate_allowed_token_ids(vocab_size)
        if self.exponential_decay_length_penalty is not None:
            decay = self.exponential_decay_length_penalty
            if not isinstance(decay, (tuple, list)) or len(decay) != 2:
                raise ValueError(
                    f"exponential_decay_length_penalty must be [start, factor], got {decay!r}"
                )
            _check_int("exponential_decay_length_penalty's start", decay[0])
            _check_number("exponential_decay_length_penalty's factor", decay[1])
            if decay[0] < 0 or not decay[1] > 0:
                raise ValueError(
                    "exponential_decay_length_penalty needs a start >= 0 and a factor > 0, "
                    f"got {list(decay)}"
                )
        if self.penalty_scope not in PENALTY_SCOPES:
            raise ValueError(
                f"penalty_scope must be one of {', '.join(PENALTY_SCOPES)}, got "
                f"{self.penalty_scope!r}"
            )

    def _validate_stop_token_sequences(self, vocab_size: int | None) -> None:
        sequences = self.stop_token_sequences
        if not isinstance(sequences, list) or not all(
            isinstance(sequence, list) and sequence for sequence in sequences
        ):
            raise ValueError(
                f"stop_token_sequences must be non-empty lists of token ids, got {sequences!r}"
            )
        if len(sequences) > MAX_STOP_STRINGS or sum(map(len, sequences)) > MAX_STOP_CHARS:
            raise ValueError(
                f"stop_token_sequences: at most {MAX_STOP_STRINGS} sequences and "
                f"{MAX_STOP_CHARS} token ids in all"
            )
        bound = vocab_size if vocab_size is not None else "the vocabulary size"
        for sequence in sequences:
            for token_id in sequence:
                _check_int("stop_token_sequences", token_id)
                if token_id < 0 or (vocab_size is not None and token_id >= vocab_size):
                    raise ValueError(
                        f"stop_token_sequences: token id {token_id} is outside [0, {bound})"
                    )

    def _validate_allowed_token_ids(self, vocab_size: int | None) -> None:
        allowed = self.allowed_token_ids
        if not isinstance(allowed, list):
            raise ValueError(f"allowed_token_ids must be a list of token ids, got {allowed!r}")
        if len(allowed) > MAX_ALLOWED_TOKEN_IDS:
            raise ValueError(
                f"allowed_token_ids holds {len(allowed)} ids; at most {MAX_ALLOWED_TOKEN_IDS} "
                "are allowed"
            )
        bound = vocab_size if vocab_size is not None else "the vocabulary size"
        for token_id in allowed:
            _check_int("allowed_token_ids", token_id)
            if token_id < 0 or (vocab_size is not None and token_id >= vocab_size):
                raise ValueError(f"allowed_token_ids: token id {token_id} is outside [0, {bound})")

    def _validate_logit_bias(self, vocab_size: int | None) -> None:
        if not isinstance(self.logit_bias, dict):
            raise ValueError(f"logit_bias must map token ids to biases, got {self.logit_bias!r}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS_TOKENS:
            raise ValueError(
                f"logit_bias holds {len(self.logit_bias)} tokens; at most "
                f"{MAX_LOGIT_BIAS_TOKENS} are allowed"
            )
        for token_id, bias in self.logit_bias.items():
            _check_int("a logit_bias token id", token_id)
            if token_id < 0 or (vocab_size is not None and token_id >= vocab_size):
                bound = vocab_size if vocab_size is not None else "the vocabulary size"
                raise ValueError(f"logit_bias token id {token_id} is outside [0, {bound})")
            _check_number("logit_bias", bias)
            if not -LOGIT_BIAS_LIMIT <= bias <= LOGIT_BIAS_LIMIT:
                raise ValueError(
                    f"logit_bias values must be in [-{LOGIT_BIAS_LIMIT:g}, {LOGIT_BIAS_LIMIT:g}], "
                    f"got {bias} for token {token_id}"
                )

    def with_model_defaults(self, generation_config: Mapping[str, Any] | None) -> SamplingParams:
        """A copy whose None knobs are filled in from the model's generation config, then from
        the global fallbacks. Values the user set are never overridden.

        `generation_config` is the parsed generation_config.json (or None/{} when the model has
        none). HF's `"do_sample": false` there makes greedy (temperature 0) the default; an absent
        `do_sample` does not (vLLM's convention: the config's temperature, else 1.0). A top_k of 0
        from either source is normalized to -1. The result is not validated: call `validate()`.
        """
        config = generation_config or {}
        model_greedy = config.get("do_sample") is False

        def resolve(name: str, fallback: Any) -> Any:
            user_value = getattr(self, name)
            if user_value is not None:
                return user_value
            model_value = config.get(name)
            return fallback if model_value is None else model_value

        temperature = self.temperature
        if temperature is None:
            temperature = 0.0 if model_greedy else resolve("temperature", DEFAULT_TEMPERATURE)
        top_k = resolve("top_k", DEFAULT_TOP_K)
        return dataclasses.replace(
            self,
            temperature=temperature,
            top_p=resolve("top_p", DEFAULT_TOP_P),
            top_k=-1 if top_k == 0 else top_k,
            min_p=resolve("min_p", DEFAULT_MIN_P),
            repetition_penalty=resolve("repetition_penalty", DEFAULT_REPETITION_PENALTY),
            stop=list(self.stop),
            stop_token_ids=list(self.stop_token_ids),
            stop_token_sequences=[list(sequence) for sequence in self.stop_token_sequences],
            logit_bias=dict(self.logit_bias),
            allowed_token_ids=list(self.allowed_token_ids),
        )


def _check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")


def _check_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if value != value:  # NaN compares unequal to itself and would pass every range check
        raise ValueError(f"{name} must not be NaN")
    # Every knob becomes a float32 on the device: past its range (JSON's 1e309 is inf already)
    # a value turns into inf there, and inf / inf into NaN logits.
    if not abs(value) <= FLOAT32_MAX:
        raise ValueError(f"{name} must be finite (at most {FLOAT32_MAX:.3g} in size), got {value}")
