"""What the chat template receives from a chat completion request: tool history, tools, roles
and the content part types clients send (vLLM's rules)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from ocula.server.chat_messages import render_chat_prompt
from ocula.server.protocol_openai import ChatCompletionRequest
from ocula.server.routes_openai_common import OpenAIError

# A template that shows everything it is given: tools, each message's role, content, tool calls
# (their arguments as the template sees them) and the call a tool result answers.
SHOW_ALL = (
    "{% if tools %}TOOLS {{ tools | map(attribute='function.name') | join(',') }}\n{% endif %}"
    "{% for m in messages %}[{{ m.role }}] {{ m.content }}"
    "{% for call in m.tool_calls or [] %} CALL {{ call.function.name }}"
    "({{ call.function.arguments | tojson }}){% endfor %}"
    "{% if m.tool_call_id %} ANSWERS {{ m.tool_call_id }}{% endif %}{{ '\\n' }}{% endfor %}"
)
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    loaded = AutoTokenizer.from_pretrained(str(tiny_checkpoint("llama")))
    loaded.chat_template = SHOW_ALL
    return loaded


def rendered(tokenizer, **body) -> str:
    request = ChatCompletionRequest.model_validate({"add_generation_prompt": False, **body})
    text, images = render_chat_prompt(tokenizer, request)
    assert images == []
    return text


def test_tool_history_reaches_the_template(tokenizer) -> None:
    # LangChain's agent history: a question, the assistant's call, the tool's result.
    messages = [
        {"role": "user", "content": "weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "ipython", "content": "a custom role"},
    ]
    text = rendered(tokenizer, messages=messages, tools=[WEATHER], tool_choice="none")
    assert text == (
        "TOOLS get_weather\n"
        "[user] weather in Paris?\n"
        '[assistant]  CALL get_weather({"city": "Paris"})\n'  # arguments parsed, as vLLM does
        "[tool] sunny ANSWERS c1\n"
        "[ipython] a custom role\n"
    )


def test_content_parts_of_every_text_kind(tokenizer) -> None:
    content = [
        {"type": "text", "text": "a"},
        {"type": "input_text", "text": "b"},
        {"type": "output_text", "text": "c"},
        {"type": "refusal", "refusal": "d"},
        "e",
    ]
    text = rendered(tokenizer, messages=[{"role": "developer", "content": content}])
    assert text == "[system] a\nb\nc\nd\ne\n"


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def with_images(tokenizer, content: list, *earlier: dict) -> tuple[str, list]:
    messages = [*earlier, {"role": "user", "content": content}]
    request = ChatCompletionRequest.model_validate(
        {"add_generation_prompt": False, "messages": messages}
    )
    return render_chat_prompt(tokenizer, request)


def test_image_tags_written_in_the_text_stand_for_the_images(tokenizer) -> None:
    """vLLM's rule: tags the client wrote are where its images go; missing ones go first."""
    text, images = with_images(tokenizer, ["Look:", image("a"), "Compare", image("b")])
    assert text == "[user] Look:\n<image>\nCompare\n<image>\n" and images[1]["data"] == "b"
    text, _ = with_images(tokenizer, [{"type": "text", "text": "A <image> and B"}, image("a")])
    assert text == "[user] A <image> and B\n"
    text, _ = with_images(tokenizer, ["<img></img> first", image("a"), image("b")])
    assert text == "[user] <image>\n<img></img> first\n"
    for content, earlier in [
        (["<image> <image>", image("a")], ()),  # more written tags than images
        ([image("a")], ({"role": "system", "content": "Reply to <image> posts."},)),
    ]:
        with pytest.raises(OpenAIError, match="image tag") as raised:
            with_images(tokenizer, content, *earlier)
        assert raised.value.status == 400
    text, images = with_images(tokenizer, ["What is <image>?"])  # no images: plain text
    assert text == "[user] What is <image>?\n" and images == []
