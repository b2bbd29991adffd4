"""The connection's guards before a request reaches the app (`server/http_protocol.py`), on a live
server over raw sockets: oversized headers, headers that never finish, a connection that sends
nothing, a pipelined request's client leaving, unparsable HTTP; and HEAD wherever GET works."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from ocula.server.http_protocol import HEADER_LIMIT_BYTES
from tests.helpers.server import RunningServer, start_server

HEADER_TIMEOUT_S = 1.5  # --request_body_timeout_s of this module's server


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory) -> Iterator[RunningServer]:
    flags = ("--max_total_token_num", "4096", "--request_body_timeout_s", str(HEADER_TIMEOUT_S))
    running = start_server(tiny_checkpoint("llama"), tmp_path_factory.mktemp("logs"), *flags)
    yield running
    assert running.stop() == 0, running.log()


def connect(server: RunningServer) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def status_and_json(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def metric(server: RunningServer, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match[1]) if match else 0.0


def test_headers_over_the_limit_get_431_at_once(server) -> None:
    with connect(server) as sock:
        started = time.monotonic()
        request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (8 * HEADER_LIMIT_BYTES)
        sock.sendall(request + b"\r\n\r\n")  # the server reads and drops the rest
        status, body = status_and_json(read_all(sock))
    assert status == 431 and body["error"]["type"] == "request_too_large"
    assert time.monotonic() - started < HEADER_TIMEOUT_S
    # Headers under the limit are served.
    assert httpx.get(server.url + "/health", headers={"X-Ok": "a" * 30_000}).status_code == 200


@pytest.mark.parametrize("sent", [b"", b"POST /generate HTTP/1.1\r\nHost: x\r\n"])
def test_headers_that_do_not_arrive_in_time_close_the_connection(server, sent) -> None:
    with connect(server) as sock:
        started = time.monotonic()
        sock.sendall(sent)
        status, body = status_and_json(read_all(sock))
        waited = time.monotonic() - started
    assert status == 408 and body["error"]["type"] == "request_timeout"
    assert HEADER_TIMEOUT_S * 0.9 < waited < HEADER_TIMEOUT_S + 5


def test_a_keep_alive_connection_serves_several_requests(server) -> None:
    with httpx.Client(base_url=server.url) as client:
        for _ in range(3):
            assert client.get("/health").status_code == 200
            time.sleep(HEADER_TIMEOUT_S / 2)


def test_a_running_request_is_aborted_when_its_pipelining_client_leaves(server) -> None:
    body = json.dumps(
        {"inputs": "hello", "parameters": {"max_new_tokens": 3000, "ignore_eos": True}}
    ).encode()
    request = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    aborted = metric(server, 'ocula_requests_total{status="aborted"}')
    with connect(server) as sock:
        sock.sendall((request + body) * 2)  # the second waits behind the first
        deadline = time.monotonic() + 10
        while metric(server, "ocula_requests_in_flight") < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    deadline = time.monotonic() + 10
    while metric(server, "ocula_requests_in_flight") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(server, "ocula_requests_in_flight") == 0
    assert metric(server, "ocula_num_requests_running") == 0
    assert metric(server, 'ocula_requests_total{status="aborted"}') == aborted + 1


def test_unparsable_http_gets_a_json_400(server) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nContent-Length: abc\r\n\r\n")
        status, body = status_and_json(read_all(sock))
    assert status == 400 and body["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "path",
    ["/health", "/metrics", "/v1/models", "/version", "/ping", "/get_model_name", "/token_load"],
)
def test_head_is_answered_where_get_is(server, path: str) -> None:
    response = httpx.head(server.url + path)
    assert response.status_code == 200 and response.content == b""


def test_an_error_answer_waits_for_the_response_streaming_before_it(server) -> None:
    """Oversized headers sent on a connection whose earlier request still streams: that stream
    finishes whole, and the 431 follows it instead of landing inside it."""
    body = json.dumps(
        {"inputs": "hello", "parameters": {"max_new_tokens": 200, "ignore_eos": True}}
    ).encode()
    head = b"POST /generate_stream HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    with connect(server) as sock:
        sock.sendall(head + body)
        received = sock.recv(65536)
        while b"data:" not in received:
            received += sock.recv(65536)
        sock.sendall(
            b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (6 * HEADER_LIMIT_BYTES)
        )
        received += read_all(sock)
    stream, _, answer = received.partition(b"HTTP/1.1 431")
    assert answer, received[-300:]
    assert stream.endswith(b"0\r\n\r\n")  # the stream's last chunk came before the 431
    events = [json.loads(line[5:]) for line in stream.split(b"\n") if line.startswith(b"data:")]
    assert len(events) == 200 and events[-1]["finished"]
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["type"] == "request_too_large"
