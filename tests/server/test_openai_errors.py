"""The OpenAI-compatible API's refusals: a 400 in OpenAI's shape naming the field, for streamed
and whole requests, before any response byte."""

from __future__ import annotations

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from ocula.server.chat_messages import render_chat_prompt
from ocula.server.protocol_openai import ChatCompletionRequest
from ocula.server.routes_openai_common import OpenAIError

CHAT = [
    {"role": "system", "content": "servers stream tokens"},
    {"role": "user", "content": [{"type": "text", "text": "the quick brown fox"}]},
]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"temperature": -1}, "temperature"),
        ({"n": 0}, "n"),
        ({"max_tokens": 10_000}, "max_tokens"),
        ({"top_p": 1.5}, "top_p"),
        ({"extra_body": {"temperature": "hot"}}, "temperature"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "fox " * 600}]}, "messages"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"five": 1}}, "logit_bias"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),  # no tools to choose from
        ({"extra_body": {"function_call": "auto"}}, "function_call"),
        ({"response_format": {}}, "response_format"),  # a type is required
        ({"extra_body": {"functions": [{"name": "f"}]}}, "functions"),
        ({"logit_bias": {"12": 1, "012": -1}}, "logit_bias"),
        # vLLM's options this server lacks are refused, never silently ignored.
        ({"extra_body": {"guided_choice": ["yes", "no"]}}, "guided_choice"),
        ({"extra_body": {"structured_outputs": {"json": {}}}}, "structured_outputs"),
        ({"extra_body": {"bad_words": ["fox"]}}, "bad_words"),
        ({"extra_body": {"use_beam_search": True}}, "use_beam_search"),
        ({"extra_body": {"prompt_logprobs": 21}}, "prompt_logprobs"),
        ({"extra_body": {"allowed_token_ids": [10**7]}}, "allowed_token_ids"),
        ({"extra_body": {"allowed_token_ids": []}}, "allowed_token_ids"),
    ],
)
def test_bad_chat_requests_are_400_naming_the_field(client, model, overrides, field) -> None:
    request = {"model": model, "messages": CHAT, **overrides}
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(**request)
    assert field in error.value.message
    assert error.value.param == field
    with pytest.raises(openai.BadRequestError):  # a stream is refused before its first byte
        client.chat.completions.create(**request, stream=True)


def test_image_parts_need_a_vision_model(client, model) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "what?"}, image]}]
    with pytest.raises(openai.BadRequestError, match="--enable_multimodal"):
        client.chat.completions.create(model=model, messages=messages)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"prompt": "fox " * 600}, "prompt"),
        ({"suffix": "tail"}, "suffix"),
        ({"prompt": [1, 2, 10**6]}, "token ids"),
        ({"extra_body": {"guided_json": {"type": "object"}}}, "guided_json"),
        ({"extra_body": {"truncate_prompt_tokens": 4}}, "truncate_prompt_tokens"),
        ({"extra_body": {"prompt_logprobs": 1}, "stream": True}, "prompt_logprobs"),
        ({"max_tokens": 0}, "max_tokens"),  # 0 only with echo
    ],
)
def test_bad_completion_requests_are_400(client, model, overrides, field) -> None:
    with pytest.raises(openai.BadRequestError, match=field):
        client.completions.create(**{"model": model, "prompt": "fox", **overrides})


def test_malformed_json_is_400_in_openai_shape(server) -> None:
    response = httpx.post(server.url + "/v1/chat/completions", content=b"{not json")
    assert response.status_code == 400
    error = response.json()["error"]
    assert "not valid JSON" in error["message"] and error["type"] == "invalid_request_error"


def test_model_without_chat_template_is_refused(tiny_checkpoint) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_checkpoint("llama")))
    tokenizer.chat_template = None
    body = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "the quick brown fox"}]}
    )
    with pytest.raises(OpenAIError, match="no chat template") as error:
        render_chat_prompt(tokenizer, body)
    assert error.value.status == 400
