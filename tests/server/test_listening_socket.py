"""The server's listening socket: connections accepted on it send small writes at once.

Nagle's algorithm on the server's side held the second write of a response (the body after
the headers, the next event of a stream) until the client's delayed ACK: about 40 ms per request
on a kept-alive connection, as every HTTP client library keeps them."""

from __future__ import annotations

import asyncio
import socket

from ocula.server.api_server import bind_socket


def test_accepted_connections_have_nagle_off() -> None:
    listening = bind_socket("127.0.0.1", 0)
    port = listening.getsockname()[1]
    assert listening.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1

    async def scenario() -> int:
        accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock = writer.get_extra_info("socket")
            accepted.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connection, sock=listening)
        async with server:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            nodelay = await asyncio.wait_for(accepted, 10)
            writer.close()
        return nodelay

    assert asyncio.run(scenario()) != 0
