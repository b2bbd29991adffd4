"""A live server on a tiny random-weight Llama, shared by the server tests of one module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers.server import RunningServer, start_server


@pytest.fixture(scope="module")
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
