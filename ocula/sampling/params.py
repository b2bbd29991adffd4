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

from ocula.sampling.param_checks import validate_params

# Global fallbacks for knobs neither the user nor the model's generation config set.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0
DEFAULT_TOP_K = -1  # off
DEFAULT_MIN_P = 0.0  # off
DEFAULT_REPETITION_PENALTY = 1.0  # off
# Temperatures below this decode greedily, as in vLLM: dividing the logits by less can overflow
# float32 (1e-39 makes them inf, and the softmax NaN) and samples what argmax picks anyway.
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    """Per-request generation options.

    Conventions (vLLM's where the two projects differ):
    - `temperature == 0` (or below GREEDY_BELOW_TEMPERATURE) means greedy decoding; top_k/top_p/min_p
      are then ignored.
    - `top_k` of -1 or 0 means no top-k filter.
    - `logprobs = None` returns no logprobs; `logprobs = k` returns the logprob of each sampled
      token plus the k most likely alternatives (k = 0: the sampled token only).
    - `min_new_tokens`: EOS and `stop_token_ids` cannot be sampled before that many new tokens.
    - `stop` strings are checked on the detokenized text by the front end; `stop_token_ids`,
      `stop_token_sequences` and EOS (unless `ignore_eos`) by the engine.
    - `stop_token_sequences` (LightLLM's `stop_sequences` of ids): the sequence stops once its
      output ends with one of these runs of ids; unlike a stop token id's, their text stays in
      the output.
    - The text of the token that stopped a sequence (EOS, a stop token id) is left out unless
      `include_stop_str_in_output` (which also keeps a stop string's) or, for EOS alone,
      `print_eos_token`.
    - `penalty_scope`, which tokens the penalties count: "vllm" (vLLM's and OpenAI's) the
      repetition penalty the prompt's and the output's, presence and frequency the output's;
      "output" all three the output's only (LightLLM's default); "prompt_and_output" all three
      both (LightLLM's `input_penalty`).
    - `allowed_token_ids`, when not empty, are the only tokens that can be sampled.
    - `prompt_logprobs = k`: the model's logprob of every prompt token after the first, given
      the tokens before it, plus the k most likely alternatives there (vLLM's). Such a request
      computes its whole prompt (no prefix-cache hit) and costs a host sync per prefill chunk.
    - `exponential_decay_length_penalty` (start, factor), transformers' and LightLLM's: once
      the output holds n > start tokens, each EOS logit gains |logit| * (factor^(n - start) - 1)
      (the gain capped at MAX_EOS_DECAY_GAIN), after the penalties.
    - `logit_bias` {token id: bias in [-100, 100]} is added to the logits before sampling,
      before the penalties (vLLM's order) and the bans of `min_new_tokens`; logprobs stay those
      of the model.
    - `banned_token_ids` are never sampled (LightLLM's `logit_bias` keys); they must leave at
      least one token of the vocabulary, and of `allowed_token_ids` when that is set.
    - `skip_prefix_cache`: the whole prompt is computed, whatever the prefix cache holds
      (LightLLM's `disable_prompt_cache`); its KV is still cached for later requests.
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
    print_eos_token: bool = False  # LightLLM's: EOS's own text ends the output
    skip_special_tokens: bool = True
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    penalty_scope: str = "vllm"
    allowed_token_ids: list[int] = field(default_factory=list)  # empty: any token
    banned_token_ids: list[int] = field(default_factory=list)
    skip_prefix_cache: bool = False
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
        if self.banned_token_ids is None:
            self.banned_token_ids = []
        if self.logit_bias is None:
            self.logit_bias = {}

    @property
    def is_greedy(self) -> bool:
        """True when the (resolved) temperature asks for argmax decoding."""
        return self.temperature is not None and self.temperature < GREEDY_BELOW_TEMPERATURE

    def validate(self, vocab_size: int | None = None) -> None:
        """Raises ValueError naming the first field that is out of range.

        Unresolved knobs (None) are accepted; resolved values are checked. With `vocab_size`,
        the token ids of `logit_bias`, `allowed_token_ids` and `stop_token_sequences` must be
        below it. (The checks are in `param_checks`.)
        """
        validate_params(self, vocab_size)

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
        if temperature < GREEDY_BELOW_TEMPERATURE:
            temperature = 0.0
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
            banned_token_ids=list(self.banned_token_ids),
        )
