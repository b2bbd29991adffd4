"""POST /v1/chat/completions: messages through the tokenizer's chat template, then generation,
answered whole or streamed as chat.completion.chunk events."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import APIRouter, Request, Response
from jinja2 import TemplateError

from ocula.server.async_engine import StreamEvent
from ocula.server.openai_logprobs import top_alternatives, top_logprob
from ocula.server.protocol_openai import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatLogprobs,
    ChatMessage,
    Delta,
    TokenLogprobEntry,
    Usage,
)
from ocula.server.routes_openai_common import (
    OpenAIError,
    check_model,
    check_stream_options,
    events_by_choice,
    openai_endpoint,
    parse_body,
    prompt_cached_tokens,
    resolve_max_tokens,
    sampling_params,
    usage,
)
from ocula.server.routes_openai_events import (
    SSE_DONE,
    EventStreamResponse,
    merge_streams,
    sse,
    sse_error,
    start_generations,
    whole_response,
)
from ocula.server.serving import ServerState, close_stream, server_state
from ocula.server.text_encoding import check_token_budget_off_loop, encode_text

router = APIRouter()

IMAGE_PART_TYPES = frozenset({"image_url", "input_image", "image"})
# Arguments of apply_chat_template that the request's chat_template_kwargs may not override.
RESERVED_TEMPLATE_ARGS = frozenset(
    {
        "conversation",
        "tokenize",
        "add_generation_prompt",
        "continue_final_message",
        "return_dict",
        "return_tensors",
        "chat_template",
        "messages",
    }
)
# What a chat template raises on arguments it cannot use (a client's chat_template_kwargs or
# messages): the client's error, answered with 400.
TEMPLATE_ERRORS = (TemplateError, ValueError, TypeError, KeyError, IndexError, AttributeError)


IMAGE_PLACEHOLDER = "<image>"


def message_text(message: ChatMessage, index: int, images: list[dict[str, str]]) -> str:
    """The message's content as one string (parts joined by newlines). Each image part becomes
    the model's image tag where it stands, and its source is appended to `images`."""
    content = message.content
    if content is None:
        if message.role == "assistant":
            return ""
        raise OpenAIError(400, f"messages[{index}] has no content", param="messages")
    if isinstance(content, str):
        return content
    texts = []
    for part_index, part in enumerate(content):
        where = f"messages[{index}].content[{part_index}]"
        if part.type == "text" and part.text is not None:
            texts.append(part.text)
        elif part.type == "text":
            raise OpenAIError(400, f"{where}: a text part needs a `text` string", param="messages")
        elif part.type in IMAGE_PART_TYPES:
            url = part.image_url.get("url") if isinstance(part.image_url, dict) else part.image_url
            if not isinstance(url, str) or not url:
                raise OpenAIError(
                    400, f"{where}: an image part needs image_url.url", param="messages"
                )
            images.append({"type": "url", "data": url})
            texts.append(IMAGE_PLACEHOLDER)
        else:
            raise OpenAIError(
                400,
                f"{where}: content parts of type {part.type!r} are not supported; send text "
                "or image_url parts",
                param="messages",
            )
    return "\n".join(texts)


def template_messages(messages: list[ChatMessage]) -> tuple[list[dict[str, str]], list[dict]]:
    """Messages as chat templates expect them (OpenAI's `developer` role is a system message),
    and the image sources in the order their tags appear."""
    result = []
    images: list[dict[str, str]] = []
    for index, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        entry = {"role": role, "content": message_text(message, index, images)}
        if message.name is not None:
            entry["name"] = message.name
        result.append(entry)
    return result, images


def render_chat_prompt(tokenizer: Any, body: ChatCompletionRequest) -> tuple[str, list[dict]]:
    """The templated conversation and its image sources. Tokenize the text without special
    tokens: templates write their own (BOS included), as `LLM.chat` does."""
    messages, images = template_messages(body.messages)
    if not getattr(tokenizer, "chat_template", None):
        raise OpenAIError(
            400,
            "this model has no chat template, so its messages cannot be formatted; use "
            "/v1/completions with a prompt formatted by hand, or serve a chat model",
            param="messages",
        )
    add_generation_prompt = body.add_generation_prompt is not False
    if body.continue_final_message and add_generation_prompt:
        raise OpenAIError(
            400,
            "continue_final_message needs add_generation_prompt: false",
            param="continue_final_message",
        )
    extra = body.chat_template_kwargs or {}
    try:
        text = tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=bool(body.continue_final_message),
            **{key: value for key, value in extra.items() if key not in RESERVED_TEMPLATE_ARGS},
        )
    except TEMPLATE_ERRORS as error:
        raise OpenAIError(
            400, f"the chat template refused the messages: {error}", param="messages"
        ) from None
    return text, images


async def tokenize_chat(state: ServerState, body: ChatCompletionRequest) -> tuple[list[int], list]:
    """Token ids of the conversation, with images expanded, and the image spans."""
    engine = state.engine
    text, sources = await asyncio.to_thread(render_chat_prompt, engine.tokenizer, body)
    if not sources:
        budget = engine.max_prompt_tokens
        return await encode_text(engine.tokenizer, text, False, budget), []
    reason = engine.image_support_error()
    if reason is not None:
        raise OpenAIError(400, f"messages: {reason}", param="messages")
    assert engine.images is not None
    await check_token_budget_off_loop(engine.tokenizer, text, engine.max_prompt_tokens)
    try:
        return await engine.images.tokenize(text, sources, None, add_special_tokens=False)
    except ValueError as error:
        raise OpenAIError(400, f"messages: {error}", param="messages") from None


def logprob_entry(tokenizer: Any, event: StreamEvent) -> TokenLogprobEntry:
    sampled = top_logprob(tokenizer, event.token_id, event.logprob or 0.0)
    alternatives = top_alternatives(tokenizer, event)
    return TokenLogprobEntry(**sampled.model_dump(), top_logprobs=alternatives)


@router.post("/v1/chat/completions")
@openai_endpoint
async def create_chat_completion(request: Request) -> Response:
    state = server_state(request)
    body = await parse_body(request, ChatCompletionRequest)
    model = check_model(state, body.model)
    stream_options = check_stream_options(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise OpenAIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    tokenizer = state.engine.tokenizer
    prompt_ids, images = await tokenize_chat(state, body)
    if body.max_completion_tokens is not None:
        requested, field = body.max_completion_tokens, "max_completion_tokens"
    else:
        requested, field = body.max_tokens, "max_tokens"
    max_new_tokens = resolve_max_tokens(state, requested, len(prompt_ids), "messages", field)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling_params(body, max_new_tokens, logprobs)
    prepared = state.engine.prepare(prompt_ids, params, images)
    request_id = state.new_request_id("chatcmpl")
    generations = await start_generations(request, state, request_id, [prepared])
    events = merge_streams(generations.streams)
    reply = ChatReply(tokenizer, request_id, model, int(time.time()), len(prompt_ids), logprobs)
    if body.stream:
        n, include_usage = prepared.params.n, bool(stream_options.include_usage)
        return EventStreamResponse(reply.stream(events, n, include_usage), generations.close)
    return await whole_response(request, events, generations, reply.whole)


class ChatReply:
    """Builds the response of one chat request from its events."""

    def __init__(
        self,
        tokenizer: Any,
        request_id: str,
        model: str,
        created: int,
        prompt_len: int,
        logprobs: int | None,
    ) -> None:
        self.tokenizer = tokenizer
        self.request_id = request_id
        self.model = model
        self.created = created
        self.prompt_len = prompt_len
        self.with_logprobs = logprobs is not None

    def usage(self, completion_tokens: int, cached_tokens: int) -> Usage:
        return usage([self.prompt_len], completion_tokens, cached_tokens)

    def whole(self, collected: list[tuple[int, StreamEvent]]) -> ChatCompletion:
        choices = []
        for index, events in sorted(events_by_choice(collected, 1).items()):
            logprobs = None
            if self.with_logprobs:
                entries = [
                    logprob_entry(self.tokenizer, e) for e in events if e.logprob is not None
                ]
                logprobs = ChatLogprobs(content=entries)
            last = events[-1]
            choices.append(
                ChatChoice(
                    index=index,
                    message=AssistantMessage(content="".join(e.text for e in events)),
                    logprobs=logprobs,
                    finish_reason=last.finish_reason,
                    stop_reason=last.stop_reason,
                )
            )
        return ChatCompletion(
            id=self.request_id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=self.usage(len(collected), prompt_cached_tokens(collected)),
        )

    def chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        return sse(
            ChatCompletionChunk(
                id=self.request_id,
                created=self.created,
                model=self.model,
                choices=choices,
                usage=usage,
            )
        )

    async def stream(
        self, events: AsyncGenerator[tuple[int, StreamEvent], None], n: int, include_usage: bool
    ) -> AsyncGenerator[str, None]:
        """Per choice: a role chunk, content chunks, then a chunk with `finish_reason` and an
        empty delta; with include_usage a last chunk with no choices and the usage; `[DONE]`."""
        completion_tokens = 0
        cached_tokens = 0
        try:
            for index in range(n):
                role = Delta(role="assistant", content="")
                yield self.chunk([ChatChunkChoice(index=index, delta=role)])
            async for _, event in events:
                completion_tokens += 1
                cached_tokens = max(cached_tokens, event.num_cached_tokens)
                logprobs = None
                if self.with_logprobs and event.logprob is not None:
                    logprobs = ChatLogprobs(content=[logprob_entry(self.tokenizer, event)])
                if event.text or logprobs is not None:
                    delta = Delta(content=event.text)
                    choice = ChatChunkChoice(index=event.index, delta=delta, logprobs=logprobs)
                    yield self.chunk([choice])
                if event.finish_reason is not None:
                    choice = ChatChunkChoice(
                        index=event.index,
                        delta=Delta(),
                        finish_reason=event.finish_reason,
                        stop_reason=event.stop_reason,
                    )
                    yield self.chunk([choice])
            if include_usage:
                yield self.chunk([], self.usage(completion_tokens, cached_tokens))
            yield SSE_DONE
        except Exception as error:
            yield sse_error(error)
            yield SSE_DONE
        finally:
            await close_stream(events)
