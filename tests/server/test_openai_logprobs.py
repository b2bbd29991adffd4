"""Prompt logprobs and token restrictions through the OpenAI routes, against the offline engine:
echo with logprobs (lm-evaluation-harness's scoring), vLLM's `prompt_logprobs`, and
`allowed_token_ids`; and vLLM's continuous usage stats on streams."""

from __future__ import annotations

import json

import httpx
import pytest

from ocula import SamplingParams
from tests.server.test_openai_api import CHAT, PROMPTS


def test_echo_with_logprobs_scores_the_prompt_as_offline(client, model, llm) -> None:
    """lm-evaluation-harness's loglikelihood request: the prompt echoed with its tokens'
    logprobs (None for the first), then the generated token's."""
    params = SamplingParams(temperature=0, max_new_tokens=1, logprobs=2, prompt_logprobs=2)
    expected = llm.generate(PROMPTS[1], params)[0]
    reply = client.completions.create(
        model=model, prompt=PROMPTS[1], temperature=0, max_tokens=1, logprobs=2, echo=True
    )
    choice = reply.choices[0]
    assert choice.text == PROMPTS[1] + expected.text
    logprobs = choice.logprobs
    prompt_ids = expected.prompt_token_ids
    assert len(logprobs.tokens) == len(prompt_ids) + 1
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    for position in range(1, len(prompt_ids)):
        entry = expected.prompt_logprobs[position]
        assert logprobs.token_logprobs[position] == pytest.approx(entry.logprob, abs=1e-5)
        top = logprobs.top_logprobs[position]
        assert top[logprobs.tokens[position]] == logprobs.token_logprobs[position]
        assert 2 <= len(top) <= 3
    generated = expected.outputs[0].logprobs[0]
    assert logprobs.token_logprobs[-1] == pytest.approx(generated.logprob, abs=1e-5)
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset[-1] == len(PROMPTS[1])


def test_vllm_prompt_logprobs_rank_the_prompt_tokens(client, model, llm) -> None:
    params = SamplingParams(temperature=0, max_new_tokens=1, prompt_logprobs=2)
    expected = llm.generate(PROMPTS[0], params)[0]
    reply = client.completions.create(
        model=model, prompt=PROMPTS[0], max_tokens=1, extra_body={"prompt_logprobs": 2}
    )
    scored = reply.choices[0].model_extra["prompt_logprobs"]
    assert scored[0] is None and len(scored) == len(expected.prompt_token_ids)
    for position in range(1, len(scored)):
        entry = expected.prompt_logprobs[position]
        mine = scored[position][str(entry.token_id)]
        assert mine["logprob"] == pytest.approx(entry.logprob, abs=1e-5)
        assert mine["rank"] >= 1 and mine["decoded_token"]
        for rank, (token_id, logprob) in enumerate(entry.top_logprobs, start=1):
            alternative = scored[position][str(token_id)]
            assert alternative["rank"] == rank
            assert alternative["logprob"] == pytest.approx(logprob, abs=1e-5)
    chat = client.chat.completions.create(
        model=model, messages=CHAT, max_tokens=1, extra_body={"prompt_logprobs": 0}
    )
    chat_scored = chat.model_extra["prompt_logprobs"]
    assert chat_scored[0] is None and all(len(entry) == 1 for entry in chat_scored[1:])


def test_allowed_token_ids_restrict_the_tokens_as_offline(client, model, llm) -> None:
    allowed = [11, 12, 13]
    params = SamplingParams(temperature=0, max_new_tokens=8, allowed_token_ids=allowed)
    expected = llm.generate(PROMPTS[0], params)[0]
    assert set(expected.token_ids) <= set(allowed)
    reply = client.completions.create(
        model=model,
        prompt=PROMPTS[0],
        temperature=0,
        max_tokens=8,
        extra_body={"allowed_token_ids": allowed},
    )
    assert reply.choices[0].text == expected.text


def test_echo_scoring_options_each_keep_their_own_number_of_alternatives(client, model) -> None:
    reply = client.completions.create(
        model=model,
        prompt=PROMPTS[1],
        max_tokens=1,
        logprobs=1,
        echo=True,
        extra_body={"prompt_logprobs": 4},
    )
    choice = reply.choices[0]
    assert all(top is None or len(top) <= 2 for top in choice.logprobs.top_logprobs)
    scored = choice.model_extra["prompt_logprobs"]
    assert all(entry is None or 4 <= len(entry) <= 5 for entry in scored)


def test_max_tokens_0_with_echo_scores_the_prompt_alone(client, model) -> None:
    prompt = "x 🦜🦩 y and more"  # characters split over several tokens
    reply = client.completions.create(
        model=model, prompt=prompt, max_tokens=0, logprobs=0, echo=True
    )
    choice = reply.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length"
    assert reply.usage.completion_tokens == 0
    offsets = choice.logprobs.text_offset
    assert len(offsets) == reply.usage.prompt_tokens
    assert offsets == sorted(offsets) and offsets[-1] <= len(prompt)
    with_token = client.completions.create(
        model=model, prompt=prompt, max_tokens=1, logprobs=0, echo=True, temperature=0
    )
    assert with_token.choices[0].logprobs.text_offset[-1] == len(prompt)  # the generated one


def test_echoed_offsets_count_the_special_tokens_the_echo_shows(client, model) -> None:
    prompt = "<|im_start|>hello there"
    reply = client.completions.create(
        model=model, prompt=prompt, max_tokens=1, logprobs=0, echo=True, temperature=0
    )
    choice = reply.choices[0]
    tokens, offsets = choice.logprobs.tokens, choice.logprobs.text_offset
    echoed = len(tokens) - 1
    assert tokens[0] == "<|im_start|>" and offsets[:2] == [0, len("<|im_start|>")]
    assert "".join(tokens[:echoed]) == prompt  # plain ASCII: each token's text as it reads
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_continuous_usage_stats_count_the_tokens_so_far(server, route) -> None:
    body = {"max_tokens": 5, "temperature": 0, "stream": True}
    body |= {"messages": CHAT} if route.endswith("chat/completions") else {"prompt": PROMPTS[0]}
    body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    with httpx.stream("POST", server.url + route, json=body, timeout=60) as response:
        assert response.status_code == 200
        chunks = [
            json.loads(line[len("data: ") :])
            for line in response.iter_lines()
            if line.startswith("data: {")
        ]
    counts = [chunk["usage"]["completion_tokens"] for chunk in chunks]
    assert counts == sorted(counts) and counts[-1] == 5  # every chunk, growing, to the total
    prompt_tokens = {chunk["usage"]["prompt_tokens"] for chunk in chunks}
    assert len(prompt_tokens) == 1


def streamed_choices(client, **request) -> dict[int, dict]:
    """A streamed completion put back together per choice: text, legacy logprobs' four lists
    concatenated, finish reason; and the usage."""
    choices: dict[int, dict] = {}
    usage = None
    for chunk in client.completions.create(
        stream=True, stream_options={"include_usage": True}, **request
    ):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            mine = choices.setdefault(
                choice.index, {"text": "", "finish_reason": None, "logprobs": None}
            )
            mine["text"] += choice.text
            mine["finish_reason"] = choice.finish_reason or mine["finish_reason"]
            if choice.logprobs is not None:
                parts = mine["logprobs"] or {key: [] for key in LOGPROB_LISTS}
                for key in LOGPROB_LISTS:
                    parts[key] += getattr(choice.logprobs, key)
                mine["logprobs"] = parts
    choices[-1] = {"usage": usage}
    return choices


LOGPROB_LISTS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")


@pytest.mark.parametrize("max_tokens", [0, 3])
def test_echo_with_logprobs_streams_what_it_answers_whole(client, model, max_tokens) -> None:
    """vLLM streams echo with logprobs: each choice's echo chunk carries the prompt's logprobs,
    then the tokens follow as usual (max_tokens 0: the echo alone, finished by "length")."""
    request = {
        "model": model,
        "prompt": [PROMPTS[0], PROMPTS[1]],
        "n": 2,
        "temperature": 0,
        "max_tokens": max_tokens,
        "logprobs": 1,
        "echo": True,
    }
    whole = client.completions.create(**request)
    streamed = streamed_choices(client, **request)
    usage = streamed.pop(-1)["usage"]  # (cached tokens aside: the first request filled the cache)
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        whole.usage.prompt_tokens,
        whole.usage.completion_tokens,
    )
    assert sorted(streamed) == [0, 1, 2, 3]
    for choice in whole.choices:
        mine = streamed[choice.index]
        assert mine["text"] == choice.text and mine["finish_reason"] == choice.finish_reason
        assert choice.text.startswith(PROMPTS[choice.index // 2])
        assert mine["logprobs"]["tokens"] == choice.logprobs.tokens
        assert mine["logprobs"]["text_offset"] == choice.logprobs.text_offset
        # As elsewhere here, 1e-5: the second request's choices may read the first's cached
        # KV, computed in another batch (float32 sums in another order).
        scored = choice.logprobs.token_logprobs
        assert mine["logprobs"]["token_logprobs"] == pytest.approx(scored, abs=1e-5)
        for got, expected in zip(
            mine["logprobs"]["top_logprobs"], choice.logprobs.top_logprobs, strict=True
        ):
            assert got == (None if expected is None else pytest.approx(expected, abs=1e-5))


def test_echo_alone_streams_with_max_tokens_0(client, model) -> None:
    request = {"model": model, "prompt": PROMPTS[1], "max_tokens": 0, "echo": True}
    streamed = streamed_choices(client, **request)
    assert streamed.pop(-1)["usage"].completion_tokens == 0
    assert streamed == {0: {"text": PROMPTS[1], "finish_reason": "length", "logprobs": None}}
