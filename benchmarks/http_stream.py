"""A lean HTTP/1.1 client for the serving benchmark's streamed requests.

The benchmark times the server, so the client must add as little as it can to each TTFT. With
httpx's AsyncClient the two spans that hold the client's own work, from its send to the
server's first middleware and from the server's first event to the client's token, took 1.58 + 0.79 ms on the
H200 machine's host; with a bare asyncio client 0.60 + 0.12 ms (a trace of the same server,
2026-12-04). This client does only what LightLLM's `/generate_stream` needs: POST a prepared
body, read a chunked (or sized) answer, split it into SSE `data:` payloads. Idle connections
are kept for the next request (as httpx's pool did); a kept connection the server has closed
meanwhile is dropped, and the request goes on the next kept one or a new one.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import AsyncIterator

MAX_HEADER_LINES = 100


class HttpProtocolError(Exception):
    """The server's answer is not the HTTP/1.1 this client reads."""


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.reusable = True

    def close(self) -> None:
        self.reusable = False
        self.writer.close()


class HttpResponse:
    """A response being read: its status, headers (lower-case names), and body."""

    def __init__(self, connection: _Connection, status: int, headers: dict[str, str]) -> None:
        self.status = status
        self.headers = headers
        self.connection = connection
        self._done = False
        if headers.get("connection", "").lower() == "close":
            connection.reusable = False

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (chunked transfer coding, Content-Length, or to EOF)."""
        reader = self.connection.reader
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size_line = await reader.readline()
                try:
                    size = int(size_line.split(b";")[0].strip(), 16)
                except ValueError:
                    raise HttpProtocolError(f"bad chunk size line {size_line!r}") from None
                if size == 0:
                    while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                        pass  # trailer fields
                    break
                data = await reader.readexactly(size + 2)
                if data[-2:] != b"\r\n":
                    raise HttpProtocolError("a chunk does not end with CRLF")
                yield data[:-2]
        elif "content-length" in self.headers:
            remaining = int(self.headers["content-length"])
            while remaining > 0:
                data = await reader.read(min(remaining, 1 << 16))
                if not data:
                    raise HttpProtocolError("the connection closed inside the body")
                remaining -= len(data)
                yield data
        else:
            self.connection.reusable = False
            while data := await reader.read(1 << 16):
                yield data
        self._done = True

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    async def sse_data(self) -> AsyncIterator[bytes]:
        """The payload of each `data:` line of an event stream, as soon as its line is whole."""
        pending = b""
        async for chunk in self.chunks():
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line.startswith(b"data:"):
                    yield line[len(b"data:") :].strip()

    @property
    def complete(self) -> bool:
        return self._done


class StreamingClient:
    """POSTs to one server over kept-alive connections; use as `async with`."""

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"only http://host:port URLs are supported, got {url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self._idle: list[_Connection] = []

    async def __aenter__(self) -> StreamingClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()

    async def post(self, path: str, body: bytes) -> HttpResponse:
        """Sends the request and reads the status line and headers. A kept connection that
        fails before any answer (the server closed it while idle) is retried on a new one."""
        request = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        while self._idle:
            connection = self._idle.pop()
            if connection.reader.at_eof():
                connection.close()
                continue
            try:
                return await self._exchange(connection, request)
            except (ConnectionError, asyncio.IncompleteReadError, HttpProtocolError):
                connection.close()  # stale: fall through to a new connection
            except BaseException:
                connection.close()
                raise
        reader, writer = await asyncio.open_connection(self.host, self.port)
        connection = _Connection(reader, writer)
        try:
            return await self._exchange(connection, request)
        except BaseException:
            connection.close()
            raise

    def release(self, response: HttpResponse) -> None:
        """Keeps the connection for the next request if its response was read to the end;
        otherwise closes it (which tells the server the client left)."""
        connection = response.connection
        if response.complete and connection.reusable:
            self._idle.append(connection)
        else:
            connection.close()

    @staticmethod
    async def _exchange(connection: _Connection, request: bytes) -> HttpResponse:
        connection.writer.write(request)
        await connection.writer.drain()
        status_line = await connection.reader.readline()
        if not status_line:
            raise HttpProtocolError("the server closed the connection before answering")
        fields = status_line.split(None, 2)
        if len(fields) < 2 or not fields[0].startswith(b"HTTP/1.") or not fields[1].isdigit():
            raise HttpProtocolError(f"bad status line {status_line!r}")
        headers: dict[str, str] = {}
        for _ in range(MAX_HEADER_LINES):
            line = await connection.reader.readline()
            if line in (b"\r\n", b"\n"):
                return HttpResponse(connection, int(fields[1]), headers)
            name, colon, value = line.decode("latin-1").partition(":")
            if not colon:
                raise HttpProtocolError(f"bad header line {line!r}")
            headers[name.strip().lower()] = value.strip()
        raise HttpProtocolError("too many header lines")
