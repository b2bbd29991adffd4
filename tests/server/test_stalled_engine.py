"""/health turns unhealthy when the engine sends nothing while requests wait on it (a rank
stuck in a collective, a process stopped), as LightLLM's health check does after its timeout,
and healthy again once the engine speaks. Here the engine process is stopped with SIGSTOP."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.helpers.server import RunningServer, start_server
from tests.server.load_tools import metrics, server_processes, sse_payloads, wait_until_idle

STALL_S = 1.0


def wait_for_health(url: str, status: int, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while (response := httpx.get(url + "/health", timeout=5)).status_code != status:
        assert time.monotonic() < deadline, response.text
        time.sleep(0.1)
    return response.json()


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory) -> Iterator[RunningServer]:
    model = tiny_checkpoint("llama", max_position_embeddings=4096)
    flags = ("--max_total_token_num", "8192", "--max_req_total_len", "4096")
    logs = tmp_path_factory.mktemp("stall-logs")
    running = start_server(model, logs, *flags, "--engine_stall_timeout_s", str(STALL_S))
    yield running
    assert running.stop() == 0, running.log()


def test_a_silent_engine_with_work_makes_health_fail_until_it_speaks(server) -> None:
    engine = server_processes(server)["engine"]
    body = {"inputs": "fox", "parameters": {"max_new_tokens": 3000, "ignore_eos": True}}
    outcome: dict = {}
    time.sleep(2 * STALL_S)  # idle: silence without work is no stall
    assert httpx.get(server.url + "/health").status_code == 200
    with httpx.stream("POST", server.url + "/generate_stream", json=body, timeout=60) as held:
        lines = held.iter_lines()
        assert next(lines).startswith("data:")
        os.kill(engine.pid, signal.SIGSTOP)
        try:
            unhealthy = wait_for_health(server.url, 503)
        finally:
            os.kill(engine.pid, signal.SIGCONT)
        wait_for_health(server.url, 200)
        reader = threading.Thread(target=lambda: outcome.update(rest=list(lines)))
        reader.start()
        reader.join(60)
    assert unhealthy["status"] == "unhealthy"
    assert "sent nothing for" in unhealthy["message"]
    last = json.loads(sse_payloads(outcome["rest"])[-1])
    assert last["finish_reason"] == "length"  # the stream went on to its end


def test_a_client_that_stops_reading_is_no_stall(server) -> None:
    """The engine finishes the request and goes quiet while the front still waits to write the
    stream to a client that reads nothing: the engine owes nothing, /health stays 200."""
    body = {
        "prompt": "fox",
        "max_tokens": 4000,
        "ignore_eos": True,
        "logprobs": 20,  # ~2 KB an event: far more than the socket buffers hold
        "stream": True,
    }
    request = json.dumps(body).encode()
    with socket.socket() as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)  # before connect: the window
        client.connect(("127.0.0.1", server.port))
        client.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(request)}\r\n\r\n".encode()
            + request
        )
        assert client.recv(12).startswith(b"HTTP/1.1 200")
        deadline = time.monotonic() + 60
        for running in (1, 0):  # it runs (4,000 steps), then the engine is done with it
            while (sample := metrics(server))["ocula_num_requests_running"] != running:
                assert time.monotonic() < deadline, sample
                time.sleep(0.05)
        assert sample["ocula_requests_in_flight"] == 1
        time.sleep(3 * STALL_S)
        health = httpx.get(server.url + "/health")
        assert health.status_code == 200, health.text
    wait_until_idle(server)
