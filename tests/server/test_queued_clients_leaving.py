"""Clients that leave while their request waits in the queue free their place at once, on every
route; and admission counts sequences (prompts x n), not requests. A server with one running
slot and four waiting places, held by a long stream."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.helpers.server import RunningServer, start_server
from tests.server.load_tools import metrics, wait_until_idle

# One request per route that waits for its first token before answering.
LEAVERS = [
    ("/generate_stream", {"inputs": "fox", "parameters": {"max_new_tokens": 2}}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "fox"}], "max_tokens": 2}),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "fox"}], "max_tokens": 2, "stream": True},
    ),
    ("/v1/completions", {"prompt": "fox", "max_tokens": 2}),
]
# Far more tokens than the test's waits take to generate on any machine (~1 ms per token on 2
# CPU cores): the occupant holds the only running slot until the test closes its stream.
OCCUPANT = {"inputs": "fox", "parameters": {"max_new_tokens": 30000, "ignore_eos": True}}


@pytest.fixture(scope="module")
def one_slot_server(tiny_checkpoint, tmp_path_factory) -> Iterator[RunningServer]:
    running = start_server(
        tiny_checkpoint("llama", max_position_embeddings=32768),
        tmp_path_factory.mktemp("queue-logs"),
        "--max_total_token_num",
        "36000",
        "--max_req_total_len",
        "32768",
        "--running_max_req_size",
        "1",
        "--max_waiting_requests",
        "4",
    )
    yield running
    assert running.stop() == 0, running.log()


def in_flight(server: RunningServer) -> float:
    return metrics(server)["ocula_requests_in_flight"]


def test_clients_leaving_the_queue_free_their_places(one_slot_server) -> None:
    server = one_slot_server
    statuses = wait_until_idle(server)
    aborted_before = statuses.get('ocula_requests_total{status="aborted"}', 0.0)
    ok_before = statuses.get('ocula_requests_total{status="ok"}', 0.0)
    left: list[str] = []

    def leave(route: str, body: dict) -> None:
        try:
            httpx.post(server.url + route, json=body, timeout=2.0)
        except httpx.TimeoutException:
            left.append(route)

    with httpx.stream("POST", server.url + "/generate_stream", json=OCCUPANT, timeout=60) as held:
        lines = held.iter_lines()  # kept: a dropped iterator would close the stream
        assert next(lines).startswith("data:")  # the only running slot is taken
        leavers = [threading.Thread(target=leave, args=leaver) for leaver in LEAVERS]
        for thread in leavers:
            thread.start()
        for thread in leavers:
            thread.join()
        assert len(left) == len(LEAVERS)  # each waited in the queue until its client gave up
        deadline = time.monotonic() + 10
        while in_flight(server) != 1:  # the occupant still runs; the leavers are gone
            assert time.monotonic() < deadline, metrics(server)
            time.sleep(0.1)
        # Their places are free again: a new request is queued, not refused with a 503.
        queued = threading.Thread(target=leave, args=LEAVERS[0])
        queued.start()
        queued.join()
        assert len(left) == len(LEAVERS) + 1
    statuses = wait_until_idle(server)
    # None of them completed. (Each is counted as aborted only if the front had started it
    # before its client left: on a loaded machine a client may give up sooner.)
    assert statuses.get('ocula_requests_total{status="ok"}', 0.0) == ok_before
    assert statuses['ocula_requests_total{status="aborted"}'] > aborted_before
    assert "Exception in ASGI application" not in server.log()


@pytest.mark.parametrize(
    ("route", "body"),
    [
        (
            "/generate",
            {"inputs": "fox", "parameters": {"n": 6, "do_sample": True, "max_new_tokens": 2}},
        ),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 6}),
        ("/v1/completions", {"prompt": ["fox", "dog", "cat"], "n": 2}),
    ],
)
def test_admission_counts_sequences_not_requests(one_slot_server, route: str, body: dict) -> None:
    # Six sequences never fit in one running slot and four waiting places: 400, not a 503,
    # counted as a rejected request.
    rejected = 'ocula_requests_total{status="rejected"}'
    before = metrics(one_slot_server).get(rejected, 0.0)
    response = httpx.post(one_slot_server.url + route, json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert "holds at once" in response.json()["error"]["message"]
    assert metrics(one_slot_server)[rejected] == before + 1
