"""The serving benchmark's HTTP client against a scripted HTTP/1.1 server: chunked event streams
split anywhere, sized error bodies, kept-alive connections, and a kept connection that the server
closed meanwhile."""

from __future__ import annotations

import asyncio
import json

from benchmarks.http_stream import StreamingClient
from benchmarks.serving_client import stream

EVENTS = [{"token": {"id": i, "text": f"t{i}"}, "finished": i == 2} for i in range(3)]


def _chunked(payload: bytes, piece: int) -> bytes:
    out = b""
    for start in range(0, len(payload), piece):
        part = payload[start : start + piece]
        out += f"{len(part):x}\r\n".encode() + part + b"\r\n"
    return out + b"0\r\n\r\n"


class ScriptedServer:
    """Answers each request on a connection with the next of `answers` (bytes after the
    request's body is read); `close_after` closes every connection after that many answers."""

    def __init__(self, answers: list[bytes], close_after: int | None = None) -> None:
        self.answers = answers
        self.close_after = close_after
        self.connections = 0
        self.requests: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        served = 0
        while self.answers:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
            self.requests.append(await reader.readexactly(length))
            writer.write(self.answers.pop(0))
            await writer.drain()
            served += 1
            if self.close_after is not None and served >= self.close_after:
                break
        writer.close()


def _sse_answer(piece: int, extra_headers: str = "") -> bytes:
    payload = b"".join(b"data:" + json.dumps(e).encode() + b"\n\n" for e in EVENTS)
    head = (
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        f"transfer-encoding: chunked\r\n{extra_headers}\r\n"
    )
    return head.encode() + _chunked(payload, piece)


async def _run(server: ScriptedServer, bodies: list[bytes]) -> list:
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        async with StreamingClient(f"http://127.0.0.1:{port}") as client:
            return [await stream(client, body) for body in bodies]
    finally:
        listener.close()


def test_events_split_across_chunks_and_connection_reused() -> None:
    # 7-byte chunks split lines, the 'data:' prefix and the JSON anywhere.
    server = ScriptedServer([_sse_answer(7), _sse_answer(1000)])
    results = asyncio.run(_run(server, [b'{"a":1}', b'{"b":2}']))
    assert [len(r.token_times) for r in results] == [3, 3]
    assert all(r.ok and r.error is None for r in results)
    assert server.requests == [b'{"a":1}', b'{"b":2}']
    assert server.connections == 1


def test_error_status_reads_sized_body_and_keeps_connection() -> None:
    body = b'{"error":"bad"}'
    error = f"HTTP/1.1 400 Bad Request\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body
    server = ScriptedServer([error, _sse_answer(50)])
    first, second = asyncio.run(_run(server, [b"{}", b"{}"]))
    assert not first.ok and first.error == 'HTTP 400: {"error":"bad"}'
    assert second.ok and len(second.token_times) == 3
    assert server.connections == 1


def test_kept_connection_closed_by_server_is_replaced() -> None:
    # The server closes each connection after one answer without saying so.
    server = ScriptedServer([_sse_answer(50), _sse_answer(50)], close_after=1)
    results = asyncio.run(_run(server, [b"{}", b"{}"]))
    assert all(r.ok and len(r.token_times) == 3 for r in results)
    assert server.connections == 2


def test_connection_close_header_is_honoured() -> None:
    server = ScriptedServer([_sse_answer(50, "connection: close\r\n"), _sse_answer(50)])
    results = asyncio.run(_run(server, [b"{}", b"{}"]))
    assert all(r.ok for r in results)
    assert server.connections == 2


def test_error_event_in_stream_fails_the_result() -> None:
    payload = b'data:{"token":{"id":1},"finished":false}\n\ndata:{"error":{"code":503}}\n\n'
    head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    server = ScriptedServer([head + _chunked(payload, 64)])
    (result,) = asyncio.run(_run(server, [b"{}"]))
    assert len(result.token_times) == 1
    assert not result.ok and "503" in (result.error or "")


def test_trailers_and_a_sized_body_in_pieces() -> None:
    payload = b"data:" + json.dumps(EVENTS[2]).encode() + b"\n\n"
    chunked = _chunked(payload, 9)[: -len(b"\r\n")] + b"x-trailer: 1\r\n\r\n"
    trailed = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunked
    body = b'{"error": "' + b"e" * 200_000 + b'"}'  # several reads
    sized = f"HTTP/1.1 422 Unprocessable\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body
    server = ScriptedServer([trailed, sized, _sse_answer(50)])
    results = asyncio.run(_run(server, [b"{}", b"{}", b"{}"]))
    assert results[0].ok and len(results[0].token_times) == 1
    assert results[1].error is not None and results[1].error.startswith("HTTP 422")
    assert results[2].ok
    assert server.connections == 1


def test_cancelled_stream_closes_its_connection() -> None:
    async def scenario() -> bytes:
        seen_eof = asyncio.get_running_loop().create_future()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(2)
            first = b'data:{"token":{"id":1},"finished":false}\n\n'
            head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
            writer.write(head + f"{len(first):x}\r\n".encode() + first + b"\r\n")
            await writer.drain()
            seen_eof.set_result(await reader.read())  # b"" once the client has gone

        listener = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        try:
            async with StreamingClient(f"http://127.0.0.1:{port}") as client:
                task = asyncio.create_task(stream(client, b"{}"))
                await asyncio.sleep(0.2)  # the first event is in, the stream waits for more
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                return await asyncio.wait_for(seen_eof, 5)
        finally:
            listener.close()

    assert asyncio.run(scenario()) == b""
