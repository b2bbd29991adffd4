"""/metrics in Prometheus' format, overload answered with 503 + Retry-After, bodies over the
limit answered with 413, bodies that stop arriving with 408, and clients that leave mid-body or
behind pipelined requests ending quietly (a server with one running slot, no waiting room, a
small body cap and a short body timeout)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.server import RunningServer, start_server

EXPECTED_FAMILIES = {
    "ocula_requests": "counter",
    "ocula_time_to_first_token_seconds": "histogram",
    "ocula_inter_token_latency_seconds": "histogram",
    "ocula_e2e_request_latency_seconds": "histogram",
    "ocula_request_queue_time_seconds": "histogram",
    "ocula_num_requests_running": "gauge",
    "ocula_num_requests_waiting": "gauge",
    "ocula_kv_cache_usage_ratio": "gauge",
    "ocula_prefix_cache_hit_rate": "gauge",
    "ocula_image_cache_hits": "counter",
    "ocula_image_cache_misses": "counter",
    "ocula_vit_batch_size": "histogram",
}


@pytest.fixture(scope="module")
def small_server(tiny_checkpoint, tmp_path_factory) -> Iterator[RunningServer]:
    running = start_server(
        tiny_checkpoint("llama"),
        tmp_path_factory.mktemp("limits-logs"),
        "--max_total_token_num",
        "1024",
        "--max_req_total_len",
        "512",
        "--running_max_req_size",
        "1",
        "--max_waiting_requests",
        "0",
        "--max_request_body_mb",
        "0.01",
        "--request_body_timeout_s",
        "0.5",
    )
    yield running
    assert running.stop() == 0, running.log()


def families(server: RunningServer) -> dict:
    text = httpx.get(server.url + "/metrics").text
    return {family.name: family for family in text_string_to_metric_families(text)}


def test_metrics_parse_and_count_requests(small_server) -> None:
    body = {"inputs": "the quick brown fox", "parameters": {"max_new_tokens": 5}}
    assert httpx.post(small_server.url + "/generate", json=body, timeout=60).status_code == 200
    found = families(small_server)
    for name, kind in EXPECTED_FAMILIES.items():
        assert name in found, f"/metrics lacks {name}"
        assert found[name].type == kind, name
    ok = [s for s in found["ocula_requests"].samples if s.labels.get("status") == "ok"]
    assert ok and ok[0].value >= 1
    ttft_count = [
        s for s in found["ocula_time_to_first_token_seconds"].samples if s.name.endswith("_count")
    ]
    assert ttft_count[0].value >= 1
    gaps = [
        s for s in found["ocula_inter_token_latency_seconds"].samples if s.name.endswith("_count")
    ]
    assert gaps[0].value >= 4  # five tokens, four gaps


def test_overload_gets_503_with_retry_after(small_server) -> None:
    long_body = {"inputs": "fox", "parameters": {"max_new_tokens": 400, "ignore_eos": True}}
    results: list[int] = []

    def occupy() -> None:
        results.append(
            httpx.post(small_server.url + "/generate", json=long_body, timeout=120).status_code
        )

    worker = threading.Thread(target=occupy)
    worker.start()
    try:
        # Wait until the only slot is taken, then one more request has nowhere to go.
        for _ in range(200):
            sample = families(small_server)["ocula_requests_in_flight"].samples[0].value
            if sample == 1:
                break
        short = {"inputs": "fox", "parameters": {"max_new_tokens": 2}}
        refused = httpx.post(small_server.url + "/generate", json=short, timeout=60)
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "1"
        assert "capacity" in refused.json()["error"]["message"]
    finally:
        worker.join()
    assert results == [200]  # the admitted request completed


def test_body_over_the_limit_gets_413(small_server) -> None:
    big = {"inputs": "x" * 20_000}
    response = httpx.post(small_server.url + "/generate", json=big, timeout=60)
    assert response.status_code == 413
    assert "larger than the limit" in response.json()["error"]["message"]
    # Without a Content-Length (chunked upload), the limit holds as the body streams in.
    chunks = (b"x" * 4096 for _ in range(8))
    response = httpx.post(small_server.url + "/generate", content=chunks, timeout=60)
    assert response.status_code == 413
    short = {"inputs": "fox", "parameters": {"max_new_tokens": 2}}
    ok = httpx.post(small_server.url + "/generate", json=short, timeout=60)
    assert ok.status_code == 200


def raw_exchange(server: RunningServer, data: bytes, wait: float = 5.0) -> bytes:
    """Sends `data` on a new connection and reads until the server closes it (or `wait`)."""
    with socket.create_connection(("127.0.0.1", server.port)) as client:
        client.sendall(data)
        client.settimeout(wait)
        reply = b""
        while chunk := client.recv(65536):
            reply += chunk
        return reply


def test_a_body_that_stops_arriving_gets_408(small_server) -> None:
    started = time.monotonic()
    head = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
    reply = raw_exchange(small_server, head + b'{"inputs": ')
    assert time.monotonic() - started < 4  # the 0.5 s timeout, not the client's wait
    status_line, _, rest = reply.partition(b"\r\n")
    assert b" 408 " in status_line
    body = json.loads(rest.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["type"] == "request_timeout"


def test_clients_leaving_mid_body_or_behind_pipelined_requests_end_quietly(small_server) -> None:
    body = json.dumps({"inputs": "fox", "parameters": {"max_new_tokens": 2}}).encode()
    request = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    stream = request.replace(b"/generate", b"/generate_stream")
    handled_before = requests_counted(small_server)
    for data in [
        request + body[:5],  # the client closes before its body is complete
        (request + body) * 2,  # a second request waits behind the first, then the client goes
        (stream + body) * 2,
    ]:
        with socket.create_connection(("127.0.0.1", small_server.port)) as client:
            client.sendall(data)
    # At least the two requests pipelined behind others ran (whatever their status), and
    # nothing is left in flight.
    deadline = time.monotonic() + 20
    while (
        requests_counted(small_server) < handled_before + 2
        or families(small_server)["ocula_requests_in_flight"].samples[0].value
    ):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(0.5)  # whatever the pipelined requests log comes before the check
    assert httpx.get(small_server.url + "/health").status_code == 200
    log = small_server.log()
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]


def requests_counted(server: RunningServer) -> float:
    """Requests the front has finished with, whatever their status."""
    family = families(server).get("ocula_requests")
    if family is None:
        return 0.0
    return sum(sample.value for sample in family.samples if sample.name.endswith("_total"))
