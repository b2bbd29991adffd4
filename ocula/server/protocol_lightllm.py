"""Request bodies of LightLLM's native API (`/generate`, `/generate_stream`, `/tokens`); what
their parameters mean in engine terms is in `lightllm_sampling`.

Validation contract: every model is strict (JSON types only: `"5"` is not an integer, `1.5` is not
an integer, `1` is accepted where a number is expected) and refuses keys it does not know, so that
a misspelt field (`"paramters"`, `"max_tokens"`) is a 400 naming it instead of a silently ignored
option; a key sent as null is taken as not given. LightLLM's own keys are known, including those
that change nothing here (`group_request_id`, `suggested_dp_index`: LightLLM's routing between its
own processes). Ranges of the sampling knobs are checked by `SamplingParams.validate`, the one
place that knows them; the fields that never reach `SamplingParams` are range-checked here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

from ocula.multimodal.image_processing import MAX_REQUEST_TILES

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
    the global defaults apply (see `SamplingParams.with_model_defaults`); the rules that map
    them onto the engine's `SamplingParams` are in `lightllm_sampling`."""

    do_sample: bool | None = None  # False: greedy, whatever temperature/top_p/top_k say
    temperature: float | None = None  # below 1e-5: greedy
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # None: LightLLM's 65535; either way no more than the room the prompt leaves.
    max_new_tokens: int | None = None
    # LightLLM's count includes the token that ends the sequence (EOS is banned before it).
    min_new_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_sequences: StopSequence | list[StopSequence] | None = None
    seed: int | None = None  # -1: a random seed, as unset (LightLLM's)
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
    # LightLLM's: the token ids named by the keys are never sampled (the values are not used).
    logit_bias: dict[str, StrictInt | float] | None = None
    disable_prompt_cache: bool = False  # compute the whole prompt, whatever the cache holds
    # LightLLM's routing between its own processes: accepted, nothing to do here.
    group_request_id: int | None = None
    suggested_dp_index: int | None = None

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
    audios: list[Any] = Field(default_factory=list)  # LightLLM's; none can be served here
    # LightLLM's: the images' embeddings are computed afresh, under keys no other request uses,
    # so no cache entry is shared (the entries left are evicted like any other).
    skip_image_cache: bool = False


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
