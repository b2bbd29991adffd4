"""A live server on a tiny random-weight Llama, shared by every server test that asks for
`server` (one start for the session: a start costs ~5 s of a 2-core CI machine, mostly the two
processes' imports), an `openai` client of it with the name of its model, and the offline engine
on the same weights.

Tests on the shared server must leave it as they found it (no request in flight, no KV held)
and compare counters as differences, never as absolute values: other modules ran before."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from ocula import LLM
from tests.helpers.server import RunningServer, start_server


@pytest.fixture(scope="session")
def server(tiny_checkpoint, tmp_path_factory) -> Iterator[RunningServer]:
    running = start_server(
        tiny_checkpoint("llama"),
        tmp_path_factory.mktemp("server-logs"),
        "--max_total_token_num",
        "2048",
        "--max_req_total_len",
        "512",
    )
    yield running
    assert running.stop() == 0, running.log()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(server) -> str:
    return httpx.get(server.url + "/get_model_name").json()["model_name"]


@pytest.fixture(scope="session")
def llm(tiny_checkpoint) -> LLM:
    """The offline engine on the server's weights and limits (same code: same greedy tokens)."""
    return LLM(str(tiny_checkpoint("llama")), max_total_token_num=2048, max_req_total_len=512)
