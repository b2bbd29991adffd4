"""vLLM's and LightLLM's readings of OpenAI request fields, on the real server: the model named
by its --model_dir, usage on a stream whose options leave it out, `top_logprobs: 0`, LightLLM's
`do_sample`, `add_special_tokens`, and vLLM fields that are refused rather than ignored."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tokenizers import processors
from transformers import AutoTokenizer

from tests.helpers.server import RunningServer, start_server
from tests.server.test_openai_api import CHAT, sse_events

BOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny Llama with a tokenizer that starts every encoding with a BOS token, so that
    `add_special_tokens` shows in the prompt's length."""
    folder = tmp_path_factory.mktemp("bos-llama")
    shutil.copytree(tiny_checkpoint("llama"), folder, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    bos_id = tokenizer.convert_tokens_to_ids(BOS)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    tokenizer.bos_token = BOS
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory) -> Iterator[RunningServer]:
    running = start_server(
        checkpoint, tmp_path_factory.mktemp("logs"), "--max_total_token_num", "2048"
    )
    yield running
    assert running.stop() == 0, running.log()


def chat(server, **body) -> httpx.Response:
    request = {"messages": CHAT, "max_tokens": 4, "temperature": 0, **body}
    return httpx.post(server.url + "/v1/chat/completions", json=request, timeout=60)


def complete(server, **body) -> httpx.Response:
    request = {"prompt": "the quick brown fox", "max_tokens": 4, "temperature": 0, **body}
    return httpx.post(server.url + "/v1/completions", json=request, timeout=60)


def test_the_model_dir_names_the_model_too(server, model, checkpoint) -> None:
    model_dir = str(checkpoint)
    assert model != model_dir
    for name in (model, model_dir, ""):
        assert chat(server, model=name).status_code == 200
    assert httpx.get(f"{server.url}/v1/models/{model_dir}").json()["id"] == model
    missing = chat(server, model="no-such-model")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("options", [{}, {"continuous_usage_stats": False}])
def test_stream_options_without_include_usage_bring_the_usage(server, options) -> None:
    with httpx.stream(
        "POST",
        server.url + "/v1/chat/completions",
        json={"messages": CHAT, "max_tokens": 3, "stream": True, "stream_options": options},
        timeout=60,
    ) as response:
        events = sse_events(response)
    chunks = [json.loads(event) for event in events[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    # Without stream_options, no usage chunk (OpenAI's and vLLM's default).
    with httpx.stream(
        "POST",
        server.url + "/v1/chat/completions",
        json={"messages": CHAT, "max_tokens": 3, "stream": True},
        timeout=60,
    ) as response:
        plain = [json.loads(event) for event in sse_events(response)[:-1]]
    assert all(chunk["choices"] and chunk.get("usage") is None for chunk in plain)


def test_top_logprobs_zero_needs_no_logprobs(server) -> None:
    assert chat(server, top_logprobs=0).status_code == 200
    refused = chat(server, top_logprobs=2)
    assert refused.status_code == 400 and "logprobs" in refused.json()["error"]["message"]


def test_do_sample_false_is_greedy(server) -> None:
    greedy = chat(server, max_tokens=8).json()["choices"][0]["message"]["content"]
    for seed in (1, 2):
        hot = chat(server, max_tokens=8, temperature=5.0, do_sample=False, seed=seed)
        assert hot.json()["choices"][0]["message"]["content"] == greedy


def test_add_special_tokens(server) -> None:
    plain = complete(server, add_special_tokens=False).json()["usage"]["prompt_tokens"]
    assert complete(server).json()["usage"]["prompt_tokens"] == plain + 1
    templated = chat(server).json()["usage"]["prompt_tokens"]
    added = chat(server, add_special_tokens=True).json()["usage"]["prompt_tokens"]
    assert added == templated + 1


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("return_tokens_as_token_ids", True),
        ("logits_processors", ["my.module:Processor"]),
        ("chat_template", "{{ messages }}"),
        ("echo", True),
        ("mm_processor_kwargs", {"min_dynamic_patch": 2}),
        ("mm_processor_kwargs", {"max_dynamic_patch": 0}),
    ],
)
def test_vllm_fields_that_would_change_the_answer_are_refused(server, field, value) -> None:
    response = chat(server, **{field: value})
    assert response.status_code == 400
    assert field in response.json()["error"]["message"]


def test_stop_ids_that_ban_the_whole_vocabulary_before_min_tokens_are_refused(server) -> None:
    response = chat(server, min_tokens=2, stop_token_ids=list(range(601)))
    assert response.status_code == 400
    assert "no token is left to sample" in response.json()["error"]["message"]
    assert chat(server, min_tokens=2, stop_token_ids=list(range(600))).status_code == 200
