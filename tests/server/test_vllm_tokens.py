"""vLLM's utility routes on the real server: /tokenize (a prompt, or chat messages counted as the
chat route counts them), /detokenize, /version and /ping."""

from __future__ import annotations

import httpx

import ocula

PROMPT = "the quick brown fox"
MESSAGES = [
    {"role": "system", "content": "servers stream tokens"},
    {"role": "user", "content": [{"type": "text", "text": PROMPT}]},
]


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60)


def test_tokenize_counts_what_the_completions_would_send(server, llm) -> None:
    counted = post(server, "/tokenize", {"prompt": PROMPT, "return_token_strs": True}).json()
    ids = llm.tokenizer.encode(PROMPT)
    assert counted["tokens"] == ids and counted["count"] == len(ids)
    assert counted["token_strs"] == llm.tokenizer.convert_ids_to_tokens(ids)
    assert counted["max_model_len"] > 0
    bare = post(server, "/tokenize", {"prompt": PROMPT, "add_special_tokens": False}).json()
    assert bare["tokens"] == llm.tokenizer.encode(PROMPT, add_special_tokens=False)
    # Messages: as many tokens as the chat route's usage reports for the same conversation.
    chat_count = post(server, "/tokenize", {"messages": MESSAGES}).json()["count"]
    reply = post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1})
    assert chat_count == reply.json()["usage"]["prompt_tokens"]


def test_detokenize_inverts_tokenize_and_bad_bodies_are_400(server, llm) -> None:
    ids = llm.tokenizer.encode(PROMPT, add_special_tokens=False)
    assert post(server, "/detokenize", {"tokens": ids}).json() == {"prompt": PROMPT}
    for path, body in [
        ("/detokenize", {"tokens": [10**7]}),
        ("/detokenize", {"tokens": "fox"}),
        ("/tokenize", {}),
        ("/tokenize", {"prompt": PROMPT, "messages": MESSAGES}),
        ("/tokenize", {"prompt": PROMPT, "model": "gpt-4o"}),
        ("/detokenize", {"tokens": [1] * 100_000}),  # more than a context holds
    ]:
        response = post(server, path, body)
        assert response.status_code in (400, 404), (path, body, response.text)
        assert "error" in response.json()


def test_tokenize_refuses_what_a_completion_would_refuse(server) -> None:
    # The server's limit is 512 tokens: 2,000 words are over it, short of the character check.
    long_prompt = "fox " * 2000
    counted = post(server, "/tokenize", {"prompt": long_prompt})
    completed = post(server, "/v1/completions", {"prompt": long_prompt, "max_tokens": 1})
    for response in (counted, completed):
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "context_length_exceeded"


def test_version_and_ping(server) -> None:
    assert httpx.get(server.url + "/version").json() == {"version": ocula.__version__}
    assert httpx.get(server.url + "/ping").status_code == 200
    assert httpx.post(server.url + "/ping").status_code == 200
