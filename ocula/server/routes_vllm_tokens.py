"""vLLM's utility routes: `POST /tokenize` (a prompt, or chat messages as the chat route renders
them, images expanded), `POST /detokenize` and `GET /version`.

`/tokenize` counts exactly what a completion or chat request of the same body would send to the
engine; like those, a prompt past the context length is refused (400, `context_length_exceeded`).
`/detokenize` takes at most a context's worth of tokens.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import Field

import ocula
from ocula.server.protocol_openai import ChatCompletionRequest, ChatMessage, OpenAIRequestModel
from ocula.server.routes_openai_chat import tokenize_chat
from ocula.server.routes_openai_common import (
    OpenAIError,
    check_model,
    context_limit,
    openai_endpoint,
    parse_body,
)
from ocula.server.serving import prepare_admitted, server_state
from ocula.server.text_encoding import encode_text

router = APIRouter()


class TokenizeRequest(OpenAIRequestModel):
    """Either `prompt` or `messages` (with the chat route's template options)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Any] | None = None
    return_token_strs: bool | None = False


class DetokenizeRequest(OpenAIRequestModel):
    model: str | None = None
    tokens: list[int]


@router.post("/tokenize")
@openai_endpoint
async def tokenize(request: Request) -> Response:
    state = server_state(request)
    body = await parse_body(request, TokenizeRequest)
    check_model(state, body.model)
    engine = state.engine
    if (body.prompt is None) == (body.messages is None):
        raise OpenAIError(400, "send either `prompt` or `messages`", param="prompt")
    if body.messages is not None:
        chat = ChatCompletionRequest.model_validate(
            body.model_dump(include=set(ChatCompletionRequest.model_fields), exclude_none=True)
        )
        # Images load under admission: refused while draining, dropped if the client leaves.
        token_ids, _ = await prepare_admitted(request, state, 0, lambda: tokenize_chat(state, chat))
    else:
        add_special = body.add_special_tokens is not False
        token_ids = await encode_text(
            engine.tokenizer, body.prompt or "", add_special, engine.max_prompt_tokens
        )
    if len(token_ids) > engine.max_prompt_tokens:  # as a completion of it would be refused
        raise OpenAIError(
            400,
            f"the prompt has {len(token_ids)} tokens, over the limit of "
            f"{engine.max_prompt_tokens} tokens a prompt may have here",
            param="messages" if body.messages is not None else "prompt",
            code="context_length_exceeded",
        )
    answer: dict[str, Any] = {
        "count": len(token_ids),
        "max_model_len": context_limit(state),
        "tokens": token_ids,
        "token_strs": None,
    }
    if body.return_token_strs:
        answer["token_strs"] = engine.tokenizer.convert_ids_to_tokens(token_ids)
    return JSONResponse(answer)


@router.post("/detokenize")
@openai_endpoint
async def detokenize(request: Request) -> Response:
    state = server_state(request)
    body = await parse_body(request, DetokenizeRequest)
    check_model(state, body.model)
    limit = context_limit(state)
    if len(body.tokens) > limit:  # more than any sequence here holds
        raise OpenAIError(
            400, f"at most {limit} tokens can be detokenized, got {len(body.tokens)}", "tokens"
        )
    vocab = state.engine.model_config.vocab_size
    bad = [token for token in body.tokens if not 0 <= token < vocab]
    if bad:
        raise OpenAIError(400, f"tokens must be in [0, {vocab}); got {bad[:5]}", param="tokens")
    decode = functools.partial(state.engine.tokenizer.decode, skip_special_tokens=False)
    text = await asyncio.to_thread(decode, body.tokens)  # a long list: off the event loop
    return JSONResponse({"prompt": text})


@router.api_route("/version", methods=["GET", "HEAD"])
async def version() -> JSONResponse:
    return JSONResponse({"version": ocula.__version__})
