"""Shutdown and crashes with requests in flight, on the real server process.

SIGTERM: new requests get 503 `server_shutting_down` (and /health says so) while those in flight
get the grace period; one that finishes in it completes normally, the others are stopped with a
503 (not yet streaming) or a last error event (streaming). The process exits 0 within seconds,
leaves no child, and a new server starts on the same port at once.
A killed engine process: requests in flight get a 503 or a last error event, /health is never
healthy again, and the server exits 1 within seconds, leaving no child."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest

import tests.helpers.server as server_helpers
from ocula.server.api_server import SHUTDOWN_GRACE_SECONDS
from tests.helpers.server import RunningServer, assert_all_gone, start_server
from tests.server.load_tools import last_error, metrics, server_processes, sse_payloads

LONG_TOKENS = 3500  # thousands of steps: still running when the grace period ends
SHORT_TOKENS = 12  # 11 steps to go at SIGTERM: in flight when the drain starts, done in it
# From SIGTERM to exit: the grace period, one second for the stopped requests' answers, the
# engine process's exit and the interpreter's own (about two seconds of module teardown).
EXIT_SECONDS = SHUTDOWN_GRACE_SECONDS + 10
CRASH_EXIT_SECONDS = 10


@pytest.fixture(scope="module")
def long_checkpoint(tiny_checkpoint) -> Path:
    return tiny_checkpoint("llama", max_position_embeddings=4096)


def launch(checkpoint: Path, tmp_path: Path) -> RunningServer:
    flags = ("--max_total_token_num", "16384", "--max_req_total_len", "4096")
    return start_server(checkpoint, tmp_path, *flags)


def lightllm(tokens: int) -> dict:
    return {"inputs": "fox", "parameters": {"max_new_tokens": tokens, "ignore_eos": True}}


def chat(tokens: int) -> dict:
    messages = [{"role": "user", "content": "fox"}]
    return {"messages": messages, "max_tokens": tokens, "ignore_eos": True, "stream": True}


async def stream(
    client: httpx.AsyncClient, route: str, body: dict, started: asyncio.Event
) -> tuple[int, list]:
    """(status, event payloads); sets `started` at the first event."""
    async with client.stream("POST", route, json=body) as response:
        if response.status_code != 200:
            return response.status_code, [await response.aread()]
        lines = []
        async for line in response.aiter_lines():
            lines.append(line)
            if line.startswith("data:"):
                started.set()
    return 200, sse_payloads(lines)


async def whole(client: httpx.AsyncClient, body: dict) -> httpx.Response:
    return await client.post("/generate", json=body)


async def wait_in_flight(server: RunningServer, count: int) -> None:
    deadline = time.monotonic() + 60
    while metrics(server)["ocula_requests_in_flight"] < count:
        assert time.monotonic() < deadline, "requests never got in flight"
        await asyncio.sleep(0.1)


def assert_stopped(payloads: list[str], error_type: str) -> None:
    """A stream that started and was then ended by the server with a last error event."""
    error = last_error(payloads)
    assert error is not None and error["code"] == 503 and error["type"] == error_type, payloads[-2:]
    assert len(payloads) > 1  # tokens came before the error


def test_sigterm_drains_stops_the_rest_and_frees_the_port(
    long_checkpoint, tmp_path, monkeypatch
) -> None:
    server = launch(long_checkpoint, tmp_path)
    children = server_processes(server)["front"].children(recursive=True)

    async def scenario() -> dict:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            started = [asyncio.Event() for _ in range(4)]
            streams = [
                asyncio.create_task(stream(client, "/generate_stream", lightllm(LONG_TOKENS), e))
                for e in started[:2]
            ]
            streams.append(
                asyncio.create_task(
                    stream(client, "/v1/chat/completions", chat(LONG_TOKENS), started[2])
                )
            )
            wholes = [asyncio.create_task(whole(client, lightllm(LONG_TOKENS))) for _ in range(2)]
            for event in started[:3]:
                await event.wait()
            await wait_in_flight(server, 5)
            short = asyncio.create_task(
                stream(client, "/generate_stream", lightllm(SHORT_TOKENS), started[3])
            )
            await started[3].wait()
            server.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            while (health := await client.get("/health")).status_code == 200:
                await asyncio.sleep(0.02)
            late = await whole(client, lightllm(4))
            late_stream = await stream(client, "/generate_stream", lightllm(4), asyncio.Event())
            return {
                "health": health,
                "late": late,
                "late_stream": late_stream,
                "short": await short,
                "streams": await asyncio.gather(*streams),
                "wholes": await asyncio.gather(*wholes),
                "signalled": signalled,
            }

    try:
        outcome = asyncio.run(scenario())
        code = server.process.wait(EXIT_SECONDS)
        exit_seconds = time.monotonic() - outcome["signalled"]
    finally:
        if server.process.poll() is None:
            server.process.kill()
    assert code == 0, server.log()
    assert exit_seconds < EXIT_SECONDS
    assert outcome["health"].status_code == 503
    assert outcome["health"].json()["status"] == "shutting_down"
    for late in (outcome["late"], outcome["late_stream"]):  # new requests: 503 before any byte
        status = late.status_code if isinstance(late, httpx.Response) else late[0]
        assert status == 503
    assert outcome["late"].headers["Retry-After"] == "1"
    assert outcome["late"].json()["error"]["type"] == "server_shutting_down"
    status, payloads = outcome["short"]  # in flight, finished within the grace period
    assert status == 200 and len(payloads) == SHORT_TOKENS
    assert json.loads(payloads[-1])["finish_reason"] == "length"
    for status, payloads in outcome["streams"]:  # cut off at the end of the grace period
        assert status == 200
        assert_stopped(payloads, "server_shutting_down")
    assert outcome["streams"][2][1][-1] == "[DONE]"  # OpenAI's stream still ends with [DONE]
    for response in outcome["wholes"]:
        assert response.status_code == 503, response.text
        assert response.json()["error"]["type"] == "server_shutting_down"
    assert "6 request(s) in flight get up to" in server.log()  # the short one included
    assert "stopped 5 request(s) still running" in server.log()
    assert_all_gone(children)
    # A new server starts on the same port at once.
    monkeypatch.setattr(server_helpers, "free_port", lambda: server.port)
    again = launch(long_checkpoint, tmp_path)
    assert again.port == server.port
    assert httpx.post(again.url + "/generate", json=lightllm(2), timeout=60).status_code == 200
    assert again.stop() == 0, again.log()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_process_group_drains_like_one_to_the_front(
    long_checkpoint, tmp_path, signum
) -> None:
    """A terminal's Ctrl-C and systemd's stop signal every process of the server: the engine
    must not die under the drain (it did, failing the requests in flight with
    engine_unavailable and the server with exit 1)."""
    flags = ("--max_total_token_num", "16384", "--max_req_total_len", "4096")
    server = start_server(long_checkpoint, tmp_path, *flags, new_session=True)
    children = server_processes(server)["front"].children(recursive=True)

    async def scenario() -> tuple[int, list]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            started = asyncio.Event()
            running = asyncio.create_task(
                stream(client, "/generate_stream", lightllm(LONG_TOKENS), started)
            )
            await started.wait()
            os.killpg(server.process.pid, signum)
            return await running

    try:
        status, payloads = asyncio.run(scenario())
        code = server.process.wait(EXIT_SECONDS)
    finally:
        if server.process.poll() is None:
            os.killpg(server.process.pid, signal.SIGKILL)
    assert code == 0, server.log()
    assert status == 200
    assert_stopped(payloads, "server_shutting_down")
    assert "stopped 1 request(s) still running" in server.log()
    assert_all_gone(children)


def test_a_killed_engine_fails_requests_in_flight_and_exits_1(long_checkpoint, tmp_path) -> None:
    server = launch(long_checkpoint, tmp_path)
    processes = server_processes(server)
    children = processes["front"].children(recursive=True)

    async def scenario() -> tuple:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            started = asyncio.Event()
            streaming = asyncio.create_task(
                stream(client, "/generate_stream", lightllm(LONG_TOKENS), started)
            )
            waiting = asyncio.create_task(whole(client, lightllm(LONG_TOKENS)))
            await started.wait()
            await wait_in_flight(server, 2)
            processes["engine"].kill()
            killed = time.monotonic()
            results = await asyncio.gather(streaming, waiting)
            try:  # from now on the server is unhealthy or gone, never healthy
                health = (await client.get("/health")).status_code
            except httpx.TransportError:
                health = None
            return (*results, health, killed)

    try:
        (status, payloads), response, health, killed = asyncio.run(scenario())
        code = server.process.wait(CRASH_EXIT_SECONDS)
        exit_seconds = time.monotonic() - killed
    finally:
        if server.process.poll() is None:
            server.process.kill()
    assert code == 1, server.log()
    assert exit_seconds < CRASH_EXIT_SECONDS
    assert status == 200
    assert_stopped(payloads, "engine_unavailable")
    assert response.status_code == 503 and "exited with code -9" in response.text, response.text
    assert health in (503, None)
    assert_all_gone(children)
    with socket.socket() as sock:  # the port is free for a restart at once
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", server.port))
