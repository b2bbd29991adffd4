"""Streamed answers send their headers and first chunk before anything else happens."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from ocula.server.eager_streaming import EagerStreamingResponse

SCOPE = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}}


async def chunks(events: list[str], produced: asyncio.Event) -> AsyncIterator[str]:
    for index, text in enumerate(events):
        if index == 1:
            await produced.wait()  # the later chunks come when the test allows
        yield text


def test_headers_and_first_chunk_go_out_before_the_disconnect_watch_starts() -> None:
    log: list[Any] = []

    async def scenario() -> None:
        produced = asyncio.Event()
        disconnect = asyncio.Event()

        async def send(message: dict[str, Any]) -> None:
            log.append((message["type"], message.get("body"), message.get("more_body")))
            if len(log) == 2:  # the first chunk is out: let the rest come
                produced.set()

        async def receive() -> dict[str, Any]:
            log.append("receive")
            await disconnect.wait()
            return {"type": "http.disconnect"}

        response = EagerStreamingResponse(
            chunks(["data:1\n\n", "data:2\n\n", "data:3\n\n"], produced),
            media_type="text/event-stream",
        )
        await asyncio.wait_for(response(SCOPE, receive, send), timeout=5)

    asyncio.run(scenario())
    assert log[0][0] == "http.response.start"
    assert log[1] == ("http.response.body", b"data:1\n\n", True)
    assert "receive" not in log[:2]
    bodies = [entry for entry in log if entry != "receive"]
    assert bodies[2:] == [
        ("http.response.body", b"data:2\n\n", True),
        ("http.response.body", b"data:3\n\n", True),
        ("http.response.body", b"", False),
    ]


def test_a_client_that_leaves_mid_stream_stops_it() -> None:
    sent: list[bytes] = []

    async def scenario() -> None:
        async def endless() -> AsyncIterator[bytes]:
            count = 0
            while True:
                count += 1
                yield f"data:{count}\n\n".encode()
                await asyncio.sleep(0.01)

        async def send(message: dict[str, Any]) -> None:
            sent.append(message.get("body", b""))

        async def receive() -> dict[str, Any]:
            await asyncio.sleep(0.05)
            return {"type": "http.disconnect"}

        response = EagerStreamingResponse(endless(), media_type="text/event-stream")
        await asyncio.wait_for(response(SCOPE, receive, send), timeout=5)

    asyncio.run(scenario())  # returns: the watch cancelled the stream
    assert sent[1] == b"data:1\n\n"
    assert 2 < len(sent) < 50


def test_an_empty_stream_still_ends_properly() -> None:
    sent: list[tuple[str, Any]] = []

    async def scenario() -> None:
        async def nothing() -> AsyncIterator[bytes]:
            return
            yield b""

        async def send(message: dict[str, Any]) -> None:
            sent.append((message["type"], message.get("body")))

        async def receive() -> dict[str, Any]:
            await asyncio.sleep(10)
            return {"type": "http.disconnect"}

        response = EagerStreamingResponse(nothing(), media_type="text/event-stream")
        await asyncio.wait_for(response(SCOPE, receive, send), timeout=5)

    asyncio.run(scenario())
    assert sent[0][0] == "http.response.start"
    assert sent[1:] == [("http.response.body", b"")]
