"""The outermost guard of the app's requests (ASGI middleware): 413 for a body over the byte
limit, declared or streamed; 408 for a body that stops arriving (no byte for `idle_timeout_s`
before it is complete), so that clients sending slowly, or not at all, cannot hold connections
for ever; and a quiet end, not a traceback, for a response whose client is gone before it could
be sent (ClientDisconnect is raised into the app, which aborts the request)."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from starlette.requests import ClientDisconnect

logger = logging.getLogger(__name__)

# Like nginx's client_body_timeout: the most time between two pieces of a body
# (--request_body_timeout_s).
BODY_IDLE_TIMEOUT_SECONDS = 30.0


class BodyTooLargeError(Exception):
    pass


class BodyTimeoutError(Exception):
    pass


class BodySizeLimit:
    def __init__(
        self, app: Any, max_bytes: int, idle_timeout_s: float = BODY_IDLE_TIMEOUT_SECONDS
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.idle_timeout_s = idle_timeout_s

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send, 413, self._too_large(), "request_too_large")
            return
        received = 0
        body_complete = False
        response_started = False
        client_gone = False

        async def limited_receive() -> dict:
            nonlocal received, body_complete
            if body_complete:  # later reads only wait for the disconnect: no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.idle_timeout_s)
            except asyncio.TimeoutError:
                raise BodyTimeoutError from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLargeError
                body_complete = not message.get("more_body", False)
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal response_started, client_gone
            if client_gone:
                raise ClientDisconnect
            if message["type"] == "http.response.start":
                response_started = True
            try:
                await send(message)
            except (RuntimeError, ConnectionError) as error:
                # uvloop refuses writes to a closed transport with a RuntimeError ("the handler
                # is closed"): a request pipelined behind others on a connection the client
                # closed is still run, and learns it only here.
                if isinstance(error, RuntimeError) and "closed" not in str(error):
                    raise
                client_gone = True
                raise ClientDisconnect from error

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLargeError:
            if not response_started:
                await self._reject(send, 413, self._too_large(), "request_too_large")
        except BodyTimeoutError:
            if not response_started:
                message = f"no part of the request body arrived for {self.idle_timeout_s:g} s"
                await self._reject(send, 408, message, "request_timeout")
        except Exception:
            if not client_gone:
                raise
            # The error handlers' own answers failed to send as well; nobody is listening.
            logger.info("%s %s: the client left before the response was sent", *_line(scope))

    def _too_large(self) -> str:
        return f"the request body is larger than the limit of {self.max_bytes} bytes"

    async def _reject(self, send: Any, status: int, message: str, error_type: str) -> None:
        body = json.dumps({"error": {"message": message, "type": error_type, "code": status}})
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),  # the rest of the body is not read
                ],
            }
        )
        await send({"type": "http.response.body", "body": body.encode()})


def _line(scope: dict) -> tuple[str, str]:
    return scope.get("method", "?"), scope.get("path", "?")
