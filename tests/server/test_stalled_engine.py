"""/health turns unhealthy when the engine sends nothing while requests wait on it (a rank
stuck in a collective, a process stopped), as LightLLM's health check does after its timeout,
and healthy again once the engine speaks. Here the engine process is stopped with SIGSTOP."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx

from tests.helpers.server import start_server
from tests.server.load_tools import server_processes, sse_payloads

STALL_S = 1.0


def wait_for_health(url: str, status: int, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while (response := httpx.get(url + "/health", timeout=5)).status_code != status:
        assert time.monotonic() < deadline, response.text
        time.sleep(0.1)
    return response.json()


def test_a_silent_engine_with_work_makes_health_fail_until_it_speaks(
    tiny_checkpoint, tmp_path
) -> None:
    model = tiny_checkpoint("llama", max_position_embeddings=4096)
    flags = ("--max_total_token_num", "8192", "--max_req_total_len", "4096")
    server = start_server(model, tmp_path, *flags, "--engine_stall_timeout_s", str(STALL_S))
    engine = server_processes(server)["engine"]
    body = {"inputs": "fox", "parameters": {"max_new_tokens": 3000, "ignore_eos": True}}
    outcome: dict = {}
    try:
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
    finally:
        assert server.stop() == 0, server.log()
