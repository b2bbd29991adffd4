"""What the OpenAI routes share: parsing and errors in OpenAI's shape, the served model's name and
context limit, the mapping onto `SamplingParams`, usage, and token texts for logprobs."""

from __future__ import annotations

import functools
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from ocula.multimodal.image_loading import ImageError
from ocula.sampling.params import SamplingParams
from ocula.server.async_engine import RequestError
from ocula.server.errors import IMAGE_ERROR_TYPES, describe_validation_error
from ocula.server.protocol_openai import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
    StreamOptions,
)
from ocula.server.request_errors import PromptTooLongError
from ocula.server.serving import ServerState

RequestModel = TypeVar("RequestModel", bound=BaseModel)


class OpenAIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}`; `code` defaults
    to the HTTP status, as every other Ocula error does."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | int | None = None,
        error_type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = status if code is None else code
        self.error_type = error_type

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": str(self),
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def openai_endpoint(
    handler: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """Answers OpenAIError and RequestError (a 400 found while preparing) in OpenAI's shape;
    anything else goes to the app's error handlers (503 overloaded, 500)."""

    @functools.wraps(handler)
    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except OpenAIError as error:
            return error.response()
        except PromptTooLongError as error:
            return OpenAIError(400, str(error), code="context_length_exceeded").response()
        except RequestError as error:
            message = str(error)
            return OpenAIError(400, message, param=named_field(message)).response()
        except ImageError as error:
            if error.status == 503:  # too many fetches waiting: the app's 503 with Retry-After
                raise
            kind = IMAGE_ERROR_TYPES.get(error.status, "invalid_image")
            return OpenAIError(
                error.status, error.message, param="messages", error_type=kind
            ).response()

    return endpoint


def named_field(message: str) -> str | None:
    """The request field a parameter check's message starts with ("logit_bias token id 9 is
    outside ...": logit_bias), as OpenAI's `param`; None when it names none."""
    match = re.match(r"[a-z_]+", message)
    if match is None:
        return None
    name = match.group()
    known = ChatCompletionRequest.model_fields.keys() | CompletionRequest.model_fields.keys()
    return name if name in known else None


async def parse_body(request: Request, model: type[RequestModel]) -> RequestModel:
    """The body validated as `model`; a 400 naming the first bad field otherwise."""
    body = await request.body()
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        problems = error.errors()
        location = problems[0].get("loc", ()) if problems else ()
        message = describe_validation_error(RequestValidationError(problems))
        raise OpenAIError(400, message, param=str(location[0]) if location else None) from None


def check_model(state: ServerState, requested: str | None) -> str:
    """The served model's name; 404 `model_not_found` when the request names another one (an
    empty or null name means the served one)."""
    served = state.engine.model_name
    # An empty name is the served model; so is the --model_dir string as given (vLLM's name
    # for a model served without --served-model-name).
    if requested and requested not in state.engine.model_names:
        raise OpenAIError(
            404,
            f"The model `{requested}` does not exist; this server serves `{served}`",
            param="model",
            code="model_not_found",
        )
    return served


def context_limit(state: ServerState) -> int:
    """The most tokens (prompt plus output) one sequence may hold."""
    ready = state.engine.ready
    assert ready is not None, "routes are served only once the engine is ready"
    return min(ready.max_req_total_len, ready.kv_capacity)


def resolve_max_tokens(
    state: ServerState,
    requested: int | None,
    prompt_len: int,
    prompt_param: str,
    max_tokens_param: str = "max_tokens",
) -> int:
    """`requested`, or when None all the room the prompt leaves (vLLM's default). Refuses a
    prompt that leaves no room and a `max_tokens` that does not fit, naming the field."""
    limit = context_limit(state)
    if prompt_len >= limit:
        raise OpenAIError(
            400,
            f"{prompt_param}: the prompt has {prompt_len} tokens, but this model's maximum "
            f"context length is {limit} tokens, which must also leave room for at least one "
            "generated token",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if requested is None:
        return limit - prompt_len
    if prompt_len + requested > limit:
        raise OpenAIError(
            400,
            f"{max_tokens_param} is {requested} and the prompt has {prompt_len} tokens: together "
            f"{prompt_len + requested}, over this model's maximum context length of {limit} "
            f"tokens; lower {max_tokens_param} or shorten the prompt",
            param=max_tokens_param,
            code="context_length_exceeded",
        )
    return requested


def check_stream_options(fields: SamplingFields) -> StreamOptions:
    if fields.stream_options is None:
        return StreamOptions(include_usage=False)
    if not fields.stream:
        raise OpenAIError(
            400, "stream_options is only allowed when stream is true", param="stream_options"
        )
    return fields.stream_options


def sampling_params(
    fields: SamplingFields, max_new_tokens: int, logprobs: int | None
) -> SamplingParams:
    """The request's knobs as `SamplingParams`; null means "not set" (model default)."""
    min_tokens = fields.min_tokens or 0
    if min_tokens > max_new_tokens:
        raise OpenAIError(
            400,
            f"min_tokens ({min_tokens}) must not exceed max_tokens ({max_new_tokens})",
            param="min_tokens",
        )
    stop = [fields.stop] if isinstance(fields.stop, str) else list(fields.stop or [])
    if any(s == "" for s in stop):
        raise OpenAIError(400, "stop strings must not be empty", param="stop")
    check_unsupported_features(fields)
    if fields.prompt_logprobs is not None and fields.stream:
        raise OpenAIError(
            400, "prompt_logprobs are answered whole: send them without stream", "prompt_logprobs"
        )
    if fields.allowed_token_ids == []:  # vLLM refuses it too: nothing could be sampled
        raise OpenAIError(400, "allowed_token_ids must not be empty", param="allowed_token_ids")
    return SamplingParams(
        n=fields.n or 1,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_tokens,
        temperature=0.0 if fields.do_sample is False else fields.temperature,
        top_p=fields.top_p,
        top_k=fields.top_k,
        min_p=fields.min_p,
        repetition_penalty=fields.repetition_penalty,
        presence_penalty=fields.presence_penalty or 0.0,
        frequency_penalty=fields.frequency_penalty or 0.0,
        seed=fields.seed,
        ignore_eos=bool(fields.ignore_eos),
        stop=stop,
        stop_token_ids=list(fields.stop_token_ids or []),
        include_stop_str_in_output=bool(fields.include_stop_str_in_output),
        skip_special_tokens=fields.skip_special_tokens is not False,
        logprobs=logprobs,
        logit_bias=logit_bias_by_id(fields.logit_bias),
        allowed_token_ids=list(fields.allowed_token_ids or []),
        prompt_logprobs=fields.prompt_logprobs,
    )


def logit_bias_by_id(logit_bias: dict[str, float] | None) -> dict[int, float]:
    """OpenAI's {"token id": bias} with integer keys (their range is checked with the other
    parameters, against the vocabulary)."""
    by_id = {}
    for key, bias in (logit_bias or {}).items():
        # Canonical decimals only: "012" and "12" would otherwise name one token twice.
        canonical = key.isascii() and key.isdigit() and len(key) <= 12 and str(int(key)) == key
        if not canonical:
            raise OpenAIError(
                400, f"logit_bias keys must be token ids, got {key[:40]!r}", param="logit_bias"
            )
        by_id[int(key)] = bias
    return by_id


# vLLM's request options that this server does not implement, with what they ask for: a
# request that sets one is refused (400), not answered as if it had not been sent.
UNSUPPORTED_OPTIONS = {
    "guided_json": "guided decoding",
    "guided_regex": "guided decoding",
    "guided_choice": "guided decoding",
    "guided_grammar": "guided decoding",
    "structural_tag": "guided decoding",
    "structured_outputs": "guided decoding",
    "bad_words": "bad words",
    "use_beam_search": "beam search",
    "truncate_prompt_tokens": "prompt truncation",
    "return_tokens_as_token_ids": "logprob tokens written as token ids",
    "logits_processors": "custom logits processors",
}


def check_unsupported_features(fields: SamplingFields) -> None:
    """400 for a response format other than text, for tools or functions a call could be asked
    of, and for any of vLLM's UNSUPPORTED_OPTIONS set."""
    for name, feature in UNSUPPORTED_OPTIONS.items():
        value = getattr(fields, name)
        if value is not None and value is not False and value != []:  # 0 asks for something
            raise OpenAIError(400, f"{name}: {feature} is not supported by this server", param=name)
    if fields.response_format is not None and "type" not in fields.response_format:
        raise OpenAIError(
            400, 'response_format needs a type, e.g. {"type": "text"}', param="response_format"
        )
    kind = (fields.response_format or {}).get("type", "text")
    if kind != "text":
        raise OpenAIError(
            400,
            f"response_format type {kind!r} is not supported: this server does not constrain "
            "its output (guided decoding); ask for text",
            param="response_format",
        )
    if not fields.tools and fields.tool_choice not in (None, "none"):
        raise OpenAIError(400, "tool_choice needs tools to choose from", param="tool_choice")
    if not fields.functions and fields.function_call not in (None, "none"):
        raise OpenAIError(400, "function_call needs functions to call", param="function_call")
    if fields.tools and fields.tool_choice != "none":
        raise OpenAIError(
            400,
            'tool calling is not supported by this server; send no tools, or tool_choice "none"',
            param="tools",
        )
    if fields.functions and fields.function_call != "none":  # the older form of tools
        raise OpenAIError(
            400,
            "function calling is not supported by this server; send no functions, or "
            'function_call "none"',
            param="functions",
        )
