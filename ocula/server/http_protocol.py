"""uvicorn's httptools connection, guarded where the body guard (`body_limit.py`) cannot reach,
before a request reaches the app:

- the request line and headers may take `HEADER_LIMIT_BYTES` (431 beyond, as nginx does for its
  header buffers; a later request of a connection may pass it by the socket read that starts
  it): httptools alone buffers headers of any size, slower the longer they get, on the event
  loop every client shares;
- they must arrive within the header deadline (`--request_body_timeout_s`; 408 after it), from the
  connection's start or from the first piece of a later request whose headers it does not
  complete: a client that connects and sends nothing, or half a header, no longer holds a
  connection for ever;
- when the connection is lost, every request of it still running learns it (uvicorn tells only
  the newest one, a pipelined request queued behind the running one), so that its generation is
  aborted and its KV freed;
- a request httptools cannot parse gets the server's JSON error body, not plain text;
- an error answer waits until the responses of earlier requests on the connection are complete,
  never landing inside one.

Not guarded here: chunked trailers (uvicorn keeps them as headers; the body guard does not count
them) and a keep-alive connection kept open by bare line breaks between requests.

`guarded_protocol` returns None when httptools is not installed; uvicorn then uses h11, which
caps headers itself (16 KiB) but has no header deadline.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from ocula.server.errors import error_body

# The request line and headers together; nginx's default buffers take 4 x 8 KiB.
HEADER_LIMIT_BYTES = 64 * 1024
# After an error answer, what the client still sends is read and dropped this long before the
# connection closes (nginx's lingering close): closing on unread bytes would send a reset, which
# can destroy the answer before the client reads it.
LINGER_SECONDS = 2.0

_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


def error_bytes(status: int, message: str, error_type: str) -> bytes:
    """A whole HTTP/1.1 response: the server's JSON error body, then the connection closes."""
    body = json.dumps(error_body(status, message, error_type)).encode()
    head = (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"connection: close\r\n\r\n" % (status, _REASONS[status], len(body))
    )
    return head + body


def guarded_protocol(header_timeout_s: float) -> type | None:
    """The guarded httptools protocol class for uvicorn's `http` setting, or None without
    httptools."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return None

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._in_headers = True  # a request's line and headers are being received
            self._header_bytes = 0
            self._header_deadline: asyncio.TimerHandle | None = None
            self._open_cycles: list[Any] = []  # this connection's requests not answered yet
            self._lingering = False  # answered with an error: reading only to drop the bytes
            self._pending_error: bytes | None = None  # waits for the responses before it

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_deadline()

        def data_received(self, data: bytes) -> None:
            if self._lingering:
                return
            was_in_headers = self._in_headers
            super().data_received(data)
            # Counted only when the whole piece was header bytes (a piece that also ends an
            # earlier body or starts a body is not): at most one piece more than the limit.
            if self._in_headers and not self._lingering:
                if was_in_headers:
                    self._header_bytes += len(data)
                    if self._header_bytes > HEADER_LIMIT_BYTES:
                        message = f"the request line and headers exceed {HEADER_LIMIT_BYTES} bytes"
                        self._close_with(431, message, "request_too_large")
                        return
                # Armed only for headers split over pieces: most arrive whole, timer-free.
                self._arm_header_deadline()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_headers = True

        def on_headers_complete(self) -> None:
            self._in_headers = False
            self._header_bytes = 0
            self._disarm_header_deadline()
            super().on_headers_complete()
            self._open_cycles = [c for c in self._open_cycles if not c.response_complete]
            if self.cycle is not None and self.cycle not in self._open_cycles:  # not an upgrade
                self._open_cycles.append(self.cycle)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_deadline()
            super().connection_lost(exc)
            for cycle in self._open_cycles:
                if not cycle.response_complete:
                    cycle.disconnected = True
                    cycle.message_event.set()
            self._open_cycles = []

        def send_400_response(self, msg: str) -> None:
            self.transport.write(error_bytes(400, msg, "invalid_request_error"))
            self.transport.close()

        def _arm_header_deadline(self) -> None:
            if self._header_deadline is None:
                self._header_deadline = self.loop.call_later(
                    header_timeout_s, self._header_deadline_passed
                )

        def _disarm_header_deadline(self) -> None:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
                self._header_deadline = None

        def _header_deadline_passed(self) -> None:
            self._header_deadline = None
            if self._in_headers and not self._lingering and not self.transport.is_closing():
                message = f"the request's headers did not arrive within {header_timeout_s:g} s"
                self._close_with(408, message, "request_timeout")

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self._pending_error is not None and not self._answering():
                answer, self._pending_error = self._pending_error, None
                self._answer_and_linger(answer)

        def _answering(self) -> bool:
            """Whether an earlier request of this connection still has a response to finish."""
            return any(not cycle.response_complete for cycle in self._open_cycles)

        def _close_with(self, status: int, message: str, error_type: str) -> None:
            """Answers once the responses before it are complete (never inside one), then drops
            whatever else comes for LINGER_SECONDS and closes."""
            self._disarm_header_deadline()
            self._lingering = True
            answer = error_bytes(status, message, error_type)
            if self._answering():
                self._pending_error = answer
            else:
                self._answer_and_linger(answer)

        def _answer_and_linger(self, answer: bytes) -> None:
            if self.transport.is_closing():
                return
            self.transport.write(answer)
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(LINGER_SECONDS, self.transport.close)

    return GuardedHttpToolsProtocol
