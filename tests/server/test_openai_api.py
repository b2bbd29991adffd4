"""The OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models) on the real
server process, driven by the `openai` client; greedy outputs are checked against the offline
`ocula.LLM` on the same checkpoint."""

from __future__ import annotations

import json
import re
import time
import uuid

import httpx
import openai
import pytest

import ocula
from ocula.sampling.params import SamplingParams

SYSTEM = "servers stream tokens, caches remember prefixes"
USER_PARTS = ["the quick brown fox", "jumps over a lazy dog"]
CHAT = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": [{"type": "text", "text": t} for t in USER_PARTS]},
]
CHAT_AS_STRINGS = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "\n".join(USER_PARTS)},
]
PROMPTS = ["the quick brown fox", "Numbers like 12, 345 and 6789 appear too!"]


@pytest.fixture(scope="module")
def offline(llm) -> ocula.LLM:
    """The same checkpoint in this process, with the server's limits."""
    return llm


def greedy(max_new_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_new_tokens=max_new_tokens)


def sse_events(response: httpx.Response) -> list[str]:
    return [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]


def metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


# -- /v1/models ---------------------------------------------------------------------------------


def test_models_and_unknown_model_names(client, model) -> None:
    listed = client.models.list().data
    assert [(m.id, m.object) for m in listed] == [(model, "model")]
    assert client.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="gpt-4o", messages=CHAT)
    assert error.value.code == "model_not_found" and error.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4o", prompt="x")
    # An empty name is the served model (vLLM); response ids never repeat.
    replies = [client.completions.create(model="", prompt="x", max_tokens=1) for _ in range(2)]
    assert all(reply.model == model for reply in replies)
    assert replies[0].id != replies[1].id and replies[0].id.startswith("cmpl-")


# -- chat ---------------------------------------------------------------------------------------


def test_chat_greedy_equals_offline_chat(client, model, offline) -> None:
    reply = client.chat.completions.create(
        model=model, messages=CHAT, temperature=0, max_tokens=24, logprobs=True
    )
    expected = offline.chat(CHAT_AS_STRINGS, greedy(24))[0]
    choice = reply.choices[0]
    assert reply.id.startswith("chatcmpl") and reply.object == "chat.completion"
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    tokenizer = offline.tokenizer
    sampled = [entry.token for entry in choice.logprobs.content]
    assert sampled == [tokenizer.decode([t], skip_special_tokens=False) for t in expected.token_ids]
    assert reply.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert reply.usage.completion_tokens == len(expected.token_ids)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_stream_joins_to_the_whole_reply(server, client, model) -> None:
    request = {"model": model, "messages": CHAT, "temperature": 0, "max_tokens": 20}
    whole = client.chat.completions.create(**request)
    body = {**request, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert content == whole.choices[0].message.content
    finishes = [
        c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]
    ]
    assert [f["finish_reason"] for f in finishes] == [whole.choices[0].finish_reason]
    assert finishes[0]["delta"] == {}
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == whole.usage.completion_tokens
    assert chunks[-1]["usage"]["prompt_tokens"] == whole.usage.prompt_tokens
    # The openai client parses the same stream.
    stream = client.chat.completions.create(**request, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == whole.choices[0].message.content


def test_chat_n_with_seed_is_reproducible(client, model) -> None:
    def sample() -> list[str]:
        reply = client.chat.completions.create(
            model=model, messages=CHAT, n=2, seed=1234, temperature=1.0, max_tokens=12
        )
        assert [c.index for c in reply.choices] == [0, 1]
        return [c.message.content for c in reply.choices]

    first = sample()
    assert sample() == first
    assert first[0] != first[1]


def test_stop_string_cuts_exactly(client, model) -> None:
    request = {"model": model, "messages": CHAT, "temperature": 0, "max_tokens": 40}
    request["extra_body"] = {"ignore_eos": True}
    text = client.chat.completions.create(**request).choices[0].message.content
    start = next(i for i in range(6, len(text) - 3) if "\ufffd" not in text[i : i + 3])
    stop = text[start : start + 3]
    for stops in (stop, ["never-in-this-text", stop]):
        cut = client.chat.completions.create(**request, stop=stops).choices[0]
        assert cut.message.content == text[: text.index(stop)]
        assert cut.finish_reason == "stop"


def test_logprobs_have_sorted_top_alternatives(client, model) -> None:
    reply = client.chat.completions.create(
        model=model, messages=CHAT, temperature=0, max_tokens=10, logprobs=True, top_logprobs=3
    )
    entries = reply.choices[0].logprobs.content
    assert len(entries) == reply.usage.completion_tokens
    for entry in entries:
        assert entry.logprob <= 0 and isinstance(entry.bytes, list) and entry.token
        top = [alt.logprob for alt in entry.top_logprobs]
        assert len(top) == 3 and top == sorted(top, reverse=True)
        assert entry.logprob == pytest.approx(top[0], abs=1e-4)  # greedy takes the best


def test_repeated_prompt_reports_cached_tokens(client, model) -> None:
    messages = [{"role": "user", "content": f"{uuid.uuid4().hex} " + " ".join(PROMPTS) * 3}]
    first = client.chat.completions.create(model=model, messages=messages, max_tokens=2)
    second = client.chat.completions.create(model=model, messages=messages, max_tokens=2)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached > first.usage.prompt_tokens_details.cached_tokens
    assert cached >= second.usage.prompt_tokens // 2


def test_unknown_fields_are_ignored_and_default_max_tokens_fills_the_context(
    client, model, offline
) -> None:
    tokenizer = offline.tokenizer
    words = 1
    while True:  # a prompt that leaves about 10 tokens of the 512-token context
        messages = [{"role": "user", "content": "fox " * words}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if len(tokenizer.encode(text, add_special_tokens=False)) >= 500:
            break
        words += 10
    reply = client.chat.completions.create(
        model=model,
        messages=messages,
        temperature=0,
        extra_body={"ignore_eos": True, "some_future_field": {"x": 1}, "top_k": 5, "min_p": 0.1},
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.total_tokens == 512  # --max_req_total_len of the test server


# -- text completions ---------------------------------------------------------------------------


def test_completion_of_a_string_or_token_ids_equals_offline(client, model, offline) -> None:
    expected = offline.generate(PROMPTS[0], greedy(10))[0]
    by_text = client.completions.create(
        model=model, prompt=PROMPTS[0], temperature=0, max_tokens=10
    )
    assert by_text.object == "text_completion"
    assert by_text.choices[0].text == expected.text
    assert by_text.usage.prompt_tokens == len(expected.prompt_token_ids)
    by_ids = client.completions.create(
        model=model, prompt=expected.prompt_token_ids, temperature=0, max_tokens=10
    )
    assert by_ids.choices[0].text == expected.text
    reply = client.completions.create(
        model=model, prompt=PROMPTS[0], temperature=0, max_tokens=6, logprobs=2
    )
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 6
    # The sampled token always among the alternatives, with at most logprobs + 1 entries; greedy,
    # it is the most likely one.
    for token, logprob, top in zip(
        logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True
    ):
        assert top[token] == logprob and len(top) <= 3 and max(top.values()) == logprob
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)


def test_logit_bias_steers_the_tokens_as_offline(client, model, offline) -> None:
    bias = {7: 100.0, 9: -100.0}  # 7 wins every step
    expected = offline.generate(PROMPTS[0], SamplingParams(temperature=0, logit_bias=bias))[0]
    assert set(expected.token_ids) == {7}
    reply = client.completions.create(
        model=model,
        prompt=PROMPTS[0],
        temperature=0,
        max_tokens=16,
        logit_bias={str(token): value for token, value in bias.items()},
    )
    assert reply.choices[0].text == expected.text
    # Text and tool choices that ask nothing this server lacks are served.
    chat = client.chat.completions.create(
        model=model,
        messages=CHAT,
        max_tokens=2,
        response_format={"type": "text"},
        tools=[{"type": "function", "function": {"name": "f"}}],
        tool_choice="none",
    )
    assert chat.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError, match=r"logit_bias token id \d+ is outside"):
        client.completions.create(model=model, prompt="fox", logit_bias={"10000000": 1})


def test_completion_defaults_to_16_tokens_and_echoes(client, model) -> None:
    reply = client.completions.create(
        model=model, prompt=PROMPTS[1], echo=True, temperature=0, extra_body={"ignore_eos": True}
    )
    assert reply.usage.completion_tokens == 16
    plain = client.completions.create(
        model=model, prompt=PROMPTS[1], temperature=0, extra_body={"ignore_eos": True}
    )
    assert reply.choices[0].text == PROMPTS[1] + plain.choices[0].text


def test_completion_batch_numbers_choices_by_prompt(client, model) -> None:
    singles = [
        client.completions.create(model=model, prompt=p, temperature=0, max_tokens=8)
        .choices[0]
        .text
        for p in PROMPTS
    ]
    batch = client.completions.create(model=model, prompt=PROMPTS, temperature=0, max_tokens=8)
    assert [c.index for c in batch.choices] == [0, 1]
    assert [c.text for c in batch.choices] == singles
    assert batch.usage.completion_tokens == 16
    echoed = client.completions.create(
        model=model, prompt=PROMPTS, n=2, echo=True, max_tokens=4, seed=3
    )
    assert [c.index for c in echoed.choices] == [0, 1, 2, 3]
    assert [c.text.startswith(PROMPTS[c.index // 2]) for c in echoed.choices] == [True] * 4
    stream = client.completions.create(
        model=model, prompt=PROMPTS, temperature=0, max_tokens=8, stream=True
    )
    streamed = ["", ""]
    for chunk in stream:
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == singles


# -- disconnects --------------------------------------------------------------------------------


def test_disconnected_stream_frees_its_kv(server, model) -> None:
    aborted_before = metric(server, 'ocula_requests_total{status="aborted"}')
    body = {"model": model, "messages": CHAT, "max_tokens": 400, "n": 2, "ignore_eos": True}
    body["stream"] = True
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as response:
        lines = response.iter_lines()
        while '"content"' not in next(lines):
            pass
        assert metric(server, "ocula_requests_in_flight") == 1
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        idle = metric(server, "ocula_requests_in_flight") == 0
        if idle and metric(server, "ocula_kv_cache_usage_ratio") == 0:
            break
        time.sleep(0.1)
    assert metric(server, "ocula_requests_in_flight") == 0
    assert metric(server, "ocula_kv_cache_usage_ratio") == 0
    assert metric(server, 'ocula_requests_total{status="aborted"}') == aborted_before + 1
