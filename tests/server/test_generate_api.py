"""LightLLM's /generate, /generate_stream and /tokens on the real server, checked against the
offline `LLM` on the same tiny checkpoint (same engine code, so greedy and seeded outputs match
token for token)."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from ocula import LLM
from ocula.sampling.params import SamplingParams

PROMPT = "the quick brown fox"
# The prompt of LightLLM's documented client (multimodal-launch.en.rst, "Testing"), without its
# image: the `<img></img>` tag is plain text to a text-only model.
CHATML_QUERY = (
    "\n<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<img></img>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n"
)
# The client's stop sequences, with the leading space LightLLM's old encoding dropped.
CLIENT_STOP_SEQUENCES = [" <|endoftext|>", " <|im_start|>", " <|im_end|>"]
SPECIAL_TEXTS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def generate(server, inputs, **parameters) -> dict:
    response = httpx.post(
        server.url + "/generate", json={"inputs": inputs, "parameters": parameters}, timeout=60
    )
    assert response.status_code == 200, response.text
    return response.json()


def stream_events(server, inputs, **parameters) -> list[dict]:
    body = {"inputs": inputs, "parameters": parameters}
    with httpx.stream("POST", server.url + "/generate_stream", json=body, timeout=60) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    chunks = raw.split("\n\n")
    assert chunks[-1] == ""
    assert all(chunk.startswith("data:{") for chunk in chunks[:-1]), raw[:200]
    return [json.loads(chunk.removeprefix("data:")) for chunk in chunks[:-1]]


def metrics(server) -> dict[str, float]:
    """Sample name (with labels) -> value, from /metrics."""
    text = httpx.get(server.url + "/metrics").text
    return {
        match[1]: float(match[2])
        for match in re.finditer(r"^([a-z_]+(?:\{[^}]*\})?) (\S+)$", text, re.M)
    }


def wait_until_idle(server, timeout: float = 10) -> dict[str, float]:
    """Polls /metrics until no request is in flight and no KV slot is held."""
    deadline = time.monotonic() + timeout
    while True:
        sample = metrics(server)
        if sample["ocula_requests_in_flight"] == 0 and sample["ocula_kv_cache_usage_ratio"] == 0:
            return sample
        assert time.monotonic() < deadline, f"still busy after {timeout} s: {sample}"
        time.sleep(0.1)


def offline(llm: LLM, prompt, **params) -> list:
    return llm.generate(prompt, SamplingParams(**params))[0].outputs


# -- stop sequences, offline ----------------------------------------------------------------------
# -- generation ---------------------------------------------------------------------------------
def test_greedy_generate_equals_the_offline_llm(server, llm) -> None:
    reference = offline(llm, PROMPT, temperature=0, max_new_tokens=16, logprobs=0)[0]
    result = generate(server, PROMPT, do_sample=False, return_details=True, max_new_tokens=16)
    prompt_ids = llm.tokenizer.encode(PROMPT)
    assert [token["id"] for token in result["tokens"]] == reference.token_ids
    assert result["generated_text"] == [reference.text]
    assert result["count_output_tokens"] == 16
    assert result["finish_reason"] == "length"
    assert result["prompt_tokens"] == len(prompt_ids)
    # LightLLM's details: each token's text is what it added (they join to the whole text),
    # with the running mean logprob and the prompt tokens the prefix cache served.
    assert "".join(token["text"] for token in result["tokens"]) == reference.text
    total = 0.0
    for position, (token, logprob) in enumerate(
        zip(result["tokens"], reference.logprobs, strict=True)
    ):
        assert token["logprob"] == pytest.approx(logprob.logprob, abs=1e-4)
        total += token["logprob"]
        assert token["cumlogprob"] == pytest.approx(total / (position + 1))
        assert token["special"] is (token["id"] in llm.tokenizer.all_special_ids)
        assert token["count_output_tokens"] == position + 1
        assert token["prompt_tokens"] == len(prompt_ids)
        assert 0 <= token["prompt_cache_len"] < len(prompt_ids)
    # The same prompt as token ids, and /tokens counting what /generate counted.
    by_ids = generate(server, prompt_ids, do_sample=False, max_new_tokens=16)
    assert by_ids["generated_text"] == result["generated_text"]
    assert "tokens" not in by_ids
    ntokens = httpx.post(server.url + "/tokens", json={"text": PROMPT}).json()["ntokens"]
    assert ntokens == len(prompt_ids)


def test_do_sample_false_and_tiny_temperature_are_greedy(server, llm) -> None:
    greedy = generate(server, PROMPT, do_sample=False, max_new_tokens=6)
    hot = generate(server, PROMPT, do_sample=False, temperature=5.0, top_k=50, max_new_tokens=6)
    assert hot["generated_text"] == greedy["generated_text"]
    tiny = generate(server, PROMPT, temperature=1e-6, max_new_tokens=6)
    assert tiny["generated_text"] == greedy["generated_text"]


def test_n_sequences_with_a_seed_match_the_offline_llm(server, llm) -> None:
    reference = offline(llm, PROMPT, n=2, seed=7, max_new_tokens=6)
    result = generate(server, PROMPT, n=2, seed=7, max_new_tokens=6, do_sample=True)
    assert result["generated_text"] == [sequence.text for sequence in reference]
    assert result["count_output_tokens"] == [6, 6]
    assert result["finish_reason"] == ["length", "length"]
    # best_of alone sets n; details come as one list per sequence.
    detailed = generate(
        server, PROMPT, best_of=2, seed=7, max_new_tokens=6, return_details=True, do_sample=True
    )
    assert detailed["generated_text"] == result["generated_text"]
    assert [[t["id"] for t in tokens] for tokens in detailed["tokens"]] == [
        sequence.token_ids for sequence in reference
    ]


def test_stream_events_concatenate_to_the_generated_text(server) -> None:
    expected = generate(server, PROMPT, do_sample=False, max_new_tokens=12, return_details=True)
    events = stream_events(server, PROMPT, do_sample=False, max_new_tokens=12)
    assert len(events) == 12
    assert "".join(event["token"]["text"] for event in events) == expected["generated_text"][0]
    assert [event["token"]["id"] for event in events] == [t["id"] for t in expected["tokens"]]
    assert [event["finished"] for event in events] == [False] * 11 + [True]
    assert [event["finish_reason"] for event in events] == [None] * 11 + ["length"]
    for position, event in enumerate(events):
        assert event["generated_text"] is None and event["details"] is None
        assert event["token"]["count_output_tokens"] == position + 1
        assert event["token"]["logprob"] == pytest.approx(expected["tokens"][position]["logprob"])


@pytest.mark.parametrize(("seed", "stop_text"), [(34, "<|im_start|>"), (13, "<|im_end|>")])
def test_lightllm_documented_client_request_stops_at_the_special_token(
    server, llm, seed, stop_text
) -> None:
    """The seed document's client request (plus a seed, so that the tiny random model's output is
    known): it must stop right at the first of its stop tokens and leave its text out."""
    special_ids = [llm.tokenizer.convert_tokens_to_ids(text) for text in SPECIAL_TEXTS]
    reference = offline(
        llm,
        CHATML_QUERY,
        seed=seed,
        max_new_tokens=200,
        ignore_eos=True,
        stop_token_ids=special_ids,
    )[0]
    first_stop = len(reference.token_ids) - 1
    assert reference.token_ids[first_stop] == llm.tokenizer.convert_tokens_to_ids(stop_text), (
        f"seed {seed} no longer reaches {stop_text}: pick another seed"
    )
    body = {
        "inputs": CHATML_QUERY,
        "parameters": {
            "max_new_tokens": 200,
            "stop_sequences": CLIENT_STOP_SEQUENCES,
            "ignore_eos": False,
            "seed": seed,
            "do_sample": True,  # unset is greedy (LightLLM); the seed picks a known output
        },
        "multimodal_params": {"images": []},
    }
    for ignore_eos in (False, True):  # with EOS ignored, only the stop sequences stop it
        body["parameters"]["ignore_eos"] = ignore_eos
        result = httpx.post(server.url + "/generate", json=body, timeout=60).json()
        assert result["count_output_tokens"] == first_stop + 1
        assert result["finish_reason"] == "stop"
        assert result["generated_text"] == [reference.text]
        assert not any(text in result["generated_text"][0] for text in SPECIAL_TEXTS)
    # Streamed alike: the events' texts add up to the same text, the last one says "stop".
    body["parameters"]["ignore_eos"] = False
    events = stream_events(server, CHATML_QUERY, **body["parameters"])
    assert len(events) == first_stop + 1
    assert "".join(event["token"]["text"] for event in events) == reference.text
    assert events[-1]["finished"] and events[-1]["finish_reason"] == "stop"
    # Without them (and EOS ignored) it runs past that point.
    body["parameters"]["ignore_eos"] = True
    del body["parameters"]["stop_sequences"]
    body["parameters"]["max_new_tokens"] = first_stop + 3
    result = httpx.post(server.url + "/generate", json=body, timeout=60).json()
    assert result["count_output_tokens"] == first_stop + 3


def test_body_without_a_json_content_type_is_read_as_json(server) -> None:
    """`curl -d '{...}'` sends application/x-www-form-urlencoded; LightLLM reads JSON anyway.
    A key sent as null counts as not given."""
    body = json.dumps({"inputs": PROMPT, "parameters": {"max_new_tokens": 2, "seed": None}})
    headers = {"content-type": "application/x-www-form-urlencoded"}
    response = httpx.post(server.url + "/generate", content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["count_output_tokens"] == 2


# -- errors -------------------------------------------------------------------------------------
IMAGE = {"type": "base64", "data": "aGVsbG8="}
BAD_REQUESTS = [
    ("/generate", b'{"inputs": "fox", ', "not valid JSON"),
    ("/generate", {"parameters": {}}, "inputs: Field required"),
    ("/generate", {"inputs": 5}, "inputs"),
    ("/generate", {"inputs": "fox", "paramters": {}}, "'paramters'"),
    ("/generate", {"inputs": "fox", "parameters": {"max_tokens": 5}}, "'max_tokens'"),
    ("/generate", {"inputs": "fox", "parameters": {"max_new_tokens": "5"}}, "max_new_tokens"),
    ("/generate", {"inputs": "fox", "parameters": {"do_sample": "no"}}, "do_sample"),
    ("/generate", {"inputs": "fox", "parameters": {"temperature": -1}}, "temperature"),
    ("/generate", {"inputs": "fox", "parameters": {"top_p": 0}}, "top_p"),
    ("/generate", {"inputs": "fox", "parameters": {"max_new_tokens": 0}}, "max_new_tokens"),
    ("/generate", {"inputs": "fox " * 600}, "--max_req_total_len"),
    # Long enough to be tokenized off the event loop (text_encoding.LONG_TEXT_CHARS).
    ("/generate", {"inputs": "fox " * 1100}, "--max_req_total_len"),
    ("/generate", {"inputs": [1, 2, 601]}, "601"),
    ("/generate", {"inputs": "fox", "parameters": {"n": 2, "best_of": 3}}, "best_of"),
    ("/generate", {"inputs": "fox", "parameters": {"stop_sequences": [[9999]]}}, "stop_seq"),
    ("/generate", {"inputs": "fox", "parameters": {"regular_constraint": "a+"}}, "constrained"),
    ("/generate", {"inputs": "fox", "parameters": {"allowed_token_ids": [601]}}, "allowed_tok"),
    ("/generate", {"inputs": "fox", "parameters": {"image_max_patch_num": 65}}, "image_max"),
    (
        "/generate",
        {"inputs": "fox", "parameters": {"exponential_decay_length_penalty": [1, 0]}},
        "exponential_decay_length_penalty",
    ),
    ("/generate", {"inputs": "x", "multimodal_params": {"images": [IMAGE]}}, "enable_multimodal"),
    ("/generate_stream", {"inputs": "fox", "parameters": {"n": 2}}, "parameters.n"),
    ("/generate_stream", {"inputs": "fox", "parameters": {"top_p": 1.5}}, "top_p"),
    ("/tokens", {"txt": "fox"}, "text"),
]


def test_malformed_requests_get_a_400_naming_the_problem(server) -> None:
    for path, body, fragment in BAD_REQUESTS:
        if isinstance(body, bytes):
            headers = {"content-type": "application/json"}
            response = httpx.post(server.url + path, content=body, headers=headers)
        else:
            response = httpx.post(server.url + path, json=body)
        assert response.status_code == 400, (path, body, response.text)
        assert response.headers["content-type"] == "application/json"
        error = response.json()["error"]
        assert set(error) == {"message", "type", "code"} and error["code"] == 400
        assert fragment in error["message"], (body, error["message"])
    # The server still serves.
    assert generate(server, PROMPT, max_new_tokens=2)["count_output_tokens"] == 2
    wait_until_idle(server)


# -- disconnects --------------------------------------------------------------------------------
def _aborted(sample: dict[str, float]) -> float:
    return sample.get('ocula_requests_total{status="aborted"}', 0.0)


def test_client_leaving_a_stream_frees_its_kv(server) -> None:
    before = _aborted(wait_until_idle(server))
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 400, "ignore_eos": True}}
    with httpx.stream("POST", server.url + "/generate_stream", json=body, timeout=60) as response:
        lines: Iterator[str] = response.iter_lines()
        assert next(lines).startswith("data:")
        busy = metrics(server)
        assert busy["ocula_requests_in_flight"] == 1
        assert busy["ocula_kv_cache_usage_ratio"] > 0
    assert _aborted(wait_until_idle(server)) == before + 1
    assert "Exception in ASGI application" not in server.log()


def test_client_leaving_a_generate_frees_its_kv(server) -> None:
    before = _aborted(wait_until_idle(server))
    body = json.dumps(
        {"inputs": PROMPT, "parameters": {"max_new_tokens": 480, "ignore_eos": True}}
    ).encode()
    head = (
        f"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as client:
        client.sendall(head + body)
        # Leave only once the request is generating, so that the abort is what frees its KV.
        deadline = time.monotonic() + 10
        while metrics(server)["ocula_requests_in_flight"] == 0:
            assert time.monotonic() < deadline, "the request never started"
    assert _aborted(wait_until_idle(server)) == before + 1
    assert "Exception in ASGI application" not in server.log()
