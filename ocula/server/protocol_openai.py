"""Pydantic models of the OpenAI-compatible API.

Requests are parsed strictly from JSON (`model_validate_json`): wrong types and out-of-range
values are refused with the field named, unknown fields are ignored (clients send many), and an
explicit `null` means "not set" for every optional knob, as vLLM treats it. Checks that involve
more than one field, the tokenizer or the server's limits live in the routes.

Responses and stream chunks serialize to the shapes the `openai` client parses, plus vLLM's
`stop_reason` on each choice.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from ocula.sampling.param_checks import MAX_LOGPROBS

MAX_CHOICES = 128  # OpenAI's own upper bound on `n`
_SEED_MIN = -(2**63)
_SEED_MAX = 2**64 - 1


class OpenAIRequestModel(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(OpenAIRequestModel):
    """Sent without `include_usage`, the usage comes (vLLM's default); not sent at all, it does
    not (`check_stream_options`)."""

    include_usage: bool | None = True
    continuous_usage_stats: bool | None = False  # vLLM's: the usage so far on every chunk


class SamplingFields(OpenAIRequestModel):
    """Fields shared by chat and text completions: OpenAI's, then vLLM's extras."""

    model: str | None = None
    n: int | None = Field(1, ge=1, le=MAX_CHOICES)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=_SEED_MIN, le=_SEED_MAX)
    presence_penalty: float | None = Field(0.0, ge=-2, le=2)
    frequency_penalty: float | None = Field(0.0, ge=-2, le=2)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # token id (a decimal string) -> bias
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    # Refused unless they ask for nothing this server lacks (no guided decoding, no tool
    # calling): answering as if they had not been sent would mislead the client.
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    # vLLM's extras.
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    min_tokens: int | None = Field(0, ge=0)
    ignore_eos: bool | None = False
    skip_special_tokens: bool | None = True
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = False
    allowed_token_ids: list[int] | None = None
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # answered whole only
    # None: chat templates write their own special tokens (False); a completion's prompt gets
    # the tokenizer's (True).
    add_special_tokens: bool | None = None
    # InternVL's tiling through vLLM's field: only max_dynamic_patch (the tile cap per image).
    mm_processor_kwargs: dict[str, Any] | None = None
    do_sample: bool | None = None  # LightLLM's: false is greedy, whatever the temperature
    # vLLM's options this server lacks: refused when set, never ignored (see
    # routes_openai_common.UNSUPPORTED_OPTIONS).
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structural_tag: Any = None
    structured_outputs: Any = None
    bad_words: list[Any] | None = None
    use_beam_search: bool | None = False
    truncate_prompt_tokens: Any = None
    return_tokens_as_token_ids: bool | None = False
    logits_processors: Any = None


class ContentPart(OpenAIRequestModel):
    """One part of a message's content: `text`, or `image_url` (`{"url": ...}` or a plain
    string; http(s) or a data URI), which needs a vision model served with --enable_multimodal."""

    type: str
    text: str | None = None
    image_url: dict[str, Any] | str | None = None
    refusal: str | None = None


class ChatMessage(OpenAIRequestModel):
    """A message of any role (vLLM's rule: `tool` and custom roles go to the chat template as
    they are; `developer` is a system message)."""

    role: str = Field(min_length=1)
    content: str | list[ContentPart | str] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # which call a `tool` message answers


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # vLLM's chat extras.
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    chat_template_kwargs: dict[str, Any] | None = None
    # vLLM's, refused when set: a request's own template (vLLM too refuses one unless started
    # with --trust-request-chat-template) and the last message echoed before the answer.
    chat_template: str | None = None
    echo: bool | None = False


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    # OpenAI's default; an explicit null: all the room; 0 only with echo (the prompt scored)
    max_tokens: int | None = Field(16, ge=0)
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)


# -- responses ---------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobEntry]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class PromptLogprob(BaseModel):
    """vLLM's entry for one token at one prompt position."""

    logprob: float
    rank: int | None
    decoded_token: str


# vLLM's `prompt_logprobs`: per prompt position, None for the first, else the prompt token and
# the most likely alternatives there, by token id (a string, as JSON keys are).
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None
    stop_reason: int | str | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | None = None


class Delta(BaseModel):
    """A stream delta: keys that are not set are left out, as OpenAI does (`{}` at the end)."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="plain")
    def _without_unset(self) -> dict[str, Any]:
        return {
            key: value
            for key, value in (("role", self.role), ("content", self.content))
            if value is not None
        }


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: parallel lists, one entry per token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = None


class Completion(BaseModel):
    """A whole text completion, or one chunk of a streamed one (same `object`, as OpenAI)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ocula"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
