"""Request bodies of LightLLM's native API (`/generate`, `/generate_stream`, `/tokens`) and what
their parameters mean in engine terms.

Parameter rules (LightLLM's, except where noted):
- `do_sample: false` is greedy (temperature 0) whatever temperature/top_p/top_k say; so is a
  temperature below 1e-5. Unset, `do_sample` is the model's generation_config.json value, else
  false: a request that only sets a temperature is greedy, as in LightLLM. Values given are still range-checked (temperature -1 is a 400 even with
  `do_sample: false`). `do_sample: true` with no temperature samples even when the model's
  generation_config.json says `do_sample: false` (at that config's temperature, else 1.0). Unset
  knobs take the model's generation_config.json, then the global defaults.
- `max_new_tokens` defaults to 16, `skip_special_tokens` and `add_special_tokens` to true; the
  latter applies to string inputs only, token-id inputs are used as sent.
- `n` defaults to `best_of` (else 1); both given, they must agree. With a seed, sequence i is
  sampled with seed + i.
- `stop_sequences`: strings matched on the text, token-id lists on the ids, see `stop_conditions`.
- `image_max_patch_num` is accepted and range-checked, and used once images are served.

Validation contract: every model is strict (JSON types only: `"5"` is not an integer, `1.5` is not
an integer, `1` is accepted where a number is expected) and refuses keys it does not know, so that
a misspelt field (`"paramters"`, `"max_tokens"`) is a 400 naming it instead of a silently ignored
option; a key sent as null is taken as not given. Ranges of the sampling knobs are checked by `SamplingParams.validate`, the one place that
knows them; the fields that never reach `SamplingParams` are range-checked here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

from ocula.multimodal.image_processing import MAX_REQUEST_TILES
from ocula.sampling.param_checks import MAX_STOP_CHARS, MAX_STOP_STRINGS
from ocula.sampling.params import DEFAULT_TEMPERATURE, SamplingParams
from ocula.server.async_engine import RequestError

# LightLLM decodes greedily below this temperature.
GREEDY_TEMPERATURE_THRESHOLD = 1e-5
# Most sequences one request may ask for (`n` / `best_of`); each one holds its own KV cache.
MAX_SEQUENCES_PER_REQUEST = 64


class _StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys_null_means_unset(cls, data: Any) -> Any:
        """Names every unknown key and lists the accepted ones (pydantic's own message for an
        extra key only says 'Extra inputs are not permitted'). A known key whose value is null
        counts as not given (clients that send every key send null for the unset ones)."""
        if not isinstance(data, dict):
            return data
        unknown = [key for key in data if key not in cls.model_fields]
        if unknown:
            accepted = ", ".join(cls.model_fields)
            names = ", ".join(repr(key) for key in unknown)
            raise ValueError(f"unknown key(s) {names}; accepted keys: {accepted}")
        return {key: value for key, value in data.items() if value is not None}


# A stop sequence is a string (matched on the text, see `stop_conditions`) or a list of ids.
StopSequence = str | list[StrictInt]


class GenerateParameters(_StrictModel):
    """`parameters` of a request. None means "not given": the model's generation_config.json or
    the global defaults apply (see `SamplingParams.with_model_defaults`)."""

    do_sample: bool | None = None  # False: greedy, whatever temperature/top_p/top_k say
    temperature: float | None = None  # below 1e-5: greedy
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_new_tokens: int = 16
    min_new_tokens: int = 0
    ignore_eos: bool = False
    stop_sequences: StopSequence | list[StopSequence] | None = None
    seed: int | None = None
    skip_special_tokens: bool = True
    n: int | None = Field(None, ge=1, le=MAX_SEQUENCES_PER_REQUEST)
    best_of: int | None = Field(None, ge=1, le=MAX_SEQUENCES_PER_REQUEST)
    return_details: bool = False
    # Tile cap for InternVL images, overriding the checkpoint's for this request; 0 or less (
    # LightLLM's default, -1) leaves the checkpoint's.
    image_max_patch_num: int | None = Field(None, le=MAX_REQUEST_TILES)
    add_special_tokens: bool = True  # applies to string inputs only
    input_penalty: bool = False  # the penalties count the prompt's tokens too
    print_eos_token: bool = False  # EOS's text (when not skipped as special) ends the output
    include_stop_str_in_output: bool = False  # a stop string's text ends the output
    # Spaces between special tokens when decoding: like LightLLM, passed to a tokenizer that
    # has the option; the fast tokenizers of the models served here have none (no effect).
    add_spaces_between_special_tokens: bool = True
    allowed_token_ids: list[StrictInt] | None = None  # only these may be sampled
    # [start, factor]: past `start` output tokens, EOS grows likelier by factor^(n - start)
    exponential_decay_length_penalty: list[StrictInt | float] | None = None
    # LightLLM's constrained decoding: refused when set (never ignored), see `to_sampling_params`.
    regular_constraint: str | None = None
    guided_grammar: str | None = None
    guided_json: str | dict[str, Any] | None = None

    @model_validator(mode="after")
    def _n_agrees_with_best_of(self) -> GenerateParameters:
        if self.n is not None and self.best_of is not None and self.n != self.best_of:
            raise ValueError(
                f"n ({self.n}) and best_of ({self.best_of}) must agree: both give the number "
                "of sequences to return"
            )
        return self

    @property
    def num_sequences(self) -> int:
        """`n`, else `best_of`, else 1."""
        return self.n or self.best_of or 1


class ImageInput(_StrictModel):
    type: Literal["url", "base64"]
    data: str


class MultimodalParams(_StrictModel):
    images: list[ImageInput] = Field(default_factory=list)


class GenerateRequest(_StrictModel):
    """Body of `/generate` and `/generate_stream`."""

    inputs: str | list[StrictInt]
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    multimodal_params: MultimodalParams = Field(default_factory=MultimodalParams)
    stream: bool = False  # LightLLM's `POST /` streams when set; the named routes ignore it


class TokensRequest(_StrictModel):
    """Body of `/tokens`: the text is tokenized exactly as `/generate` would tokenize it."""

    text: str
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    multimodal_params: MultimodalParams = Field(default_factory=MultimodalParams)


class TokenDetail(BaseModel):
    """One generated token, as every `/generate_stream` event reports it (LightLLM's shape).

    - `id`: the token id;
    - `text`: the text that this token made final, so that the texts of a sequence's tokens
      concatenate to its `generated_text` (empty while a multi-byte character is held back, and
      for an EOS unless `print_eos_token`);
    - `logprob`: the model's log-probability of the token (after temperature/penalties, as the
      sampler saw it), None if the engine did not report one;
    - `special`: whether the id is one of the tokenizer's special tokens;
    - `count_output_tokens`: output tokens of this sequence so far, this one included;
    - `prompt_tokens`: tokens of the prompt.
    """

    id: int
    text: str
    logprob: float | None
    special: bool
    count_output_tokens: int
    prompt_tokens: int


class GeneratedTokenDetail(TokenDetail):
    """One entry of `/generate`'s `tokens` (`return_details`): the stream's fields, plus
    LightLLM's `cumlogprob` (the mean logprob of the sequence's tokens so far) and
    `prompt_cache_len` (prompt tokens the prefix cache served)."""

    cumlogprob: float | None
    prompt_cache_len: int


class StreamChunk(BaseModel):
    """One `/generate_stream` event. `generated_text` and `details` are always null (LightLLM's
    shape); `finish_reason` is set on the last event only."""

    token: TokenDetail
    generated_text: None = None
    finished: bool
    finish_reason: str | None
    details: None = None


# -- meaning in engine terms ---------------------------------------------------------------------
def stop_conditions(
    tokenizer: Any, stop_sequences: StopSequence | list[StopSequence] | None, vocab_size: int
) -> tuple[list[str], list[list[int]]]:
    """(stop strings, stop token-id runs) of LightLLM's `stop_sequences`, as LightLLM today
    reads them: a string is matched on the output text, which ends before it (unless
    `include_stop_str_in_output`); a list of ints (a bare list is one sequence) is matched on
    the generated ids, and its tokens' text stays in the output.

    A string that is one special or added token, maybe after whitespace, is that token's id
    run instead: special tokens never reach the text, and LightLLM's multimodal guide has
    clients send `" <|im_end|>"` (from when LightLLM encoded strings and dropped the first id, a
    BOS for some tokenizers). Empty strings and lists stop nothing, as in LightLLM.
    """
    if stop_sequences is None:
        return [], []
    sequences = [stop_sequences] if isinstance(stop_sequences, str) else stop_sequences
    if sequences and all(isinstance(item, int) for item in sequences):
        sequences = [sequences]  # a bare list of ids is one token-id stop sequence
    # The engine's limits, checked before any tokenizing (each string may be encoded here).
    texts = [sequence for sequence in sequences if isinstance(sequence, str)]
    if len(sequences) > MAX_STOP_STRINGS or sum(map(len, texts)) > MAX_STOP_CHARS:
        raise RequestError(
            f"parameters.stop_sequences: at most {MAX_STOP_STRINGS} sequences and "
            f"{MAX_STOP_CHARS} characters in all"
        )
    strings: list[str] = []
    runs: list[list[int]] = []
    for sequence in sequences:
        if isinstance(sequence, str):
            special = _special_token_id(tokenizer, sequence)
            if special is not None:
                runs.append([special])
            elif sequence:
                strings.append(sequence)
            continue
        bad = [i for i in sequence if not 0 <= i < vocab_size]
        if bad:
            raise RequestError(
                f"parameters.stop_sequences: token ids must be in [0, {vocab_size}); got {bad[:5]}"
            )
        if sequence:
            runs.append(list(sequence))
    return strings, runs


def _special_token_id(tokenizer: Any, text: str) -> int | None:
    """The id of the special or added token that `text` is, leading whitespace aside."""
    name = text.lstrip()
    added = getattr(tokenizer, "added_tokens_encoder", {})
    return added.get(name) if name else None


def to_sampling_params(
    parameters: GenerateParameters,
    tokenizer: Any,
    vocab_size: int,
    generation_config: Mapping[str, Any] | None,
    want_logprobs: bool,
) -> SamplingParams:
    """The engine's SamplingParams for LightLLM `parameters` (rules in this module's docstring);
    raises RequestError naming the parameter at fault."""
    for name in ("regular_constraint", "guided_grammar", "guided_json"):
        if getattr(parameters, name):
            raise RequestError(
                f"parameters.{name}: constrained decoding is not supported by this server"
            )
    stop, stop_runs = stop_conditions(tokenizer, parameters.stop_sequences, vocab_size)
    params = SamplingParams(
        n=parameters.num_sequences,
        max_new_tokens=parameters.max_new_tokens,
        min_new_tokens=parameters.min_new_tokens,
        temperature=parameters.temperature,
        top_p=parameters.top_p,
        top_k=parameters.top_k,
        repetition_penalty=parameters.repetition_penalty,
        presence_penalty=parameters.presence_penalty,
        frequency_penalty=parameters.frequency_penalty,
        seed=parameters.seed,
        ignore_eos=parameters.ignore_eos,
        stop=stop,
        stop_token_sequences=stop_runs,
        include_stop_str_in_output=parameters.include_stop_str_in_output,
        print_eos_token=parameters.print_eos_token,
        skip_special_tokens=parameters.skip_special_tokens,
        penalty_scope="prompt_and_output" if parameters.input_penalty else "output",
        allowed_token_ids=list(parameters.allowed_token_ids or ()),
        exponential_decay_length_penalty=_decay(parameters.exponential_decay_length_penalty),
        logprobs=0 if want_logprobs else None,
    )
    try:
        params.validate(vocab_size)  # the values as sent, before the greedy rule replaces any
    except ValueError as error:
        raise RequestError(f"parameters.{error}") from None
    temperature = params.temperature
    do_sample = parameters.do_sample
    if do_sample is None:  # LightLLM: the model's generation_config.json, else greedy
        do_sample = bool((generation_config or {}).get("do_sample", False))
    if not do_sample or (temperature is not None and temperature < GREEDY_TEMPERATURE_THRESHOLD):
        temperature = 0.0
    elif temperature is None:
        config = generation_config or {}
        if config.get("do_sample") is False:
            temperature = config.get("temperature", DEFAULT_TEMPERATURE)
    return dataclasses.replace(params, temperature=temperature)


def _decay(value: list[int | float] | None) -> tuple[int, float] | None:
    """LightLLM's `[start, factor]` as SamplingParams takes it (its checks name a bad one)."""
    return None if value is None else tuple(value)  # type: ignore[return-value]
