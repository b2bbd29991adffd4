"""The messages of a chat completion request as the chat template gets them: content parts
joined into text (images as the model's tag, their sources collected in order), OpenAI's roles
mapped, tool calls and tool results passed through, and the template applied."""

from __future__ import annotations

import json
from typing import Any

from jinja2 import TemplateError

from ocula.multimodal.internvl_prompt import count_image_tags
from ocula.server.protocol_openai import ChatCompletionRequest, ChatMessage
from ocula.server.routes_openai_common import OpenAIError

IMAGE_PART_TYPES = frozenset({"image_url", "input_image", "image"})
# Text parts: Chat Completions' `text`, the Responses API's `input_text` / `output_text`.
TEXT_PART_TYPES = frozenset({"text", "input_text", "output_text"})
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
    """The message's content as one string (parts joined by newlines; a plain string in the list
    is a text part, a `refusal` part its refusal). Each image part becomes the model's image tag
    where it stands, and its source is appended to `images`. As in vLLM, image tags the client
    wrote in the message's text stand for its images: then none is written where the parts
    stand, and those the text lacks go first; more written tags than image parts are a 400
    (a text-only message's tags are left to `template_messages`)."""
    content = message.content
    if content is None:
        if message.role == "assistant" or message.tool_calls:
            return ""
        raise OpenAIError(400, f"messages[{index}] has no content", param="messages")
    if isinstance(content, str):
        return content
    texts: list[str] = []
    image_slots: set[int] = set()  # where image parts' tags stand in `texts`
    for part_index, part in enumerate(content):
        where = f"messages[{index}].content[{part_index}]"
        if isinstance(part, str):
            texts.append(part)
        elif part.type in TEXT_PART_TYPES and part.text is not None:
            texts.append(part.text)
        elif part.type in TEXT_PART_TYPES:
            raise OpenAIError(400, f"{where}: a text part needs a `text` string", param="messages")
        elif part.type == "refusal" and part.refusal is not None:
            texts.append(part.refusal)
        elif part.type in IMAGE_PART_TYPES:
            url = part.image_url.get("url") if isinstance(part.image_url, dict) else part.image_url
            if not isinstance(url, str) or not url:
                raise OpenAIError(
                    400, f"{where}: an image part needs image_url.url", param="messages"
                )
            images.append({"type": "url", "data": url})
            image_slots.add(len(texts))
            texts.append(IMAGE_PLACEHOLDER)
        else:
            raise OpenAIError(
                400,
                f"{where}: content parts of type {part.type!r} are not supported; send text "
                "or image_url parts",
                param="messages",
            )
    written_texts = [text for i, text in enumerate(texts) if i not in image_slots]
    written = sum(count_image_tags(text) for text in written_texts)
    if written == 0 or not image_slots:
        return "\n".join(texts)
    if written > len(image_slots):
        raise OpenAIError(
            400,
            f"messages[{index}]: the text holds {written} image tags (<image> or <img></img>) "
            f"for {len(image_slots)} image part(s)",
            param="messages",
        )
    missing = [IMAGE_PLACEHOLDER] * (len(image_slots) - written)
    return "\n".join(missing + written_texts)


def template_messages(messages: list[ChatMessage]) -> tuple[list[dict[str, Any]], list[dict]]:
    """Messages as chat templates expect them (OpenAI's `developer` role is a system message;
    other roles, `tool` included, pass as they are, with an assistant's `tool_calls` and a tool
    result's `tool_call_id`), and the image sources in the order their tags appear."""
    result = []
    images: list[dict[str, str]] = []
    text_only_tags: list[int] = []  # messages without images whose text holds image tags
    for index, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        before = len(images)
        text = message_text(message, index, images)
        if len(images) == before and count_image_tags(text):
            text_only_tags.append(index)
        entry: dict[str, Any] = {"role": role, "content": text}
        if message.name is not None:
            entry["name"] = message.name
        if message.tool_calls:
            entry["tool_calls"] = [template_tool_call(call) for call in message.tool_calls]
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        result.append(entry)
    if images and text_only_tags:  # such a tag would take another message's image
        raise OpenAIError(
            400,
            f"messages[{text_only_tags[0]}]: the text holds an image tag (<image> or "
            "<img></img>) but the message has no image part",
            param="messages",
        )
    return result, images


def template_tool_call(call: dict[str, Any]) -> dict[str, Any]:
    """A tool call as templates read it: its function's `arguments`, a JSON string on the wire,
    parsed into an object where it is one (templates render them with `tojson`), as vLLM does."""
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except ValueError:
        return call
    if not isinstance(arguments, dict):
        return call
    return {**call, "function": {**function, "arguments": arguments}}


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
    extra = dict(body.chat_template_kwargs or {})
    if body.tools and "tools" not in extra:  # with tool_choice "none": described, never called
        extra["tools"] = body.tools
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
