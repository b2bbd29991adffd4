"""A streaming response whose headers and first chunk leave together, and closing a stream so
that its cleanup (aborting the request) runs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


async def close_stream(stream: AsyncIterator[Any]) -> None:
    """Closes an async generator (running its cleanup: aborting the request); other iterators
    have nothing to close."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


class EagerStreamingResponse(StreamingResponse):
    """A StreamingResponse that sends its headers and first chunk back to back, before it starts
    watching for the client's disconnect, instead of sending the headers, then setting up that
    watch (Starlette's task group), then asking its body for a first chunk. The routes prime
    their streams (`primed`), so the first chunk is ready at once: the first token leaves
    sooner. The rest streams as Starlette streams it."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        chunks = aiter(self.body_iterator)
        try:
            first = await anext(chunks, None)
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            if first is not None:
                await send(
                    {"type": "http.response.body", "body": self._bytes(first), "more_body": True}
                )
        except BaseException:  # e.g. the client is gone: close the stream (aborts the request)
            await close_stream(chunks)
            raise
        self.body_iterator = chunks
        await super().__call__(scope, receive, send)  # streams the rest through stream_response

    async def stream_response(self, send: Send) -> None:
        """Starlette's, less the headers: `__call__` has sent them."""
        async for chunk in self.body_iterator:
            await send(
                {"type": "http.response.body", "body": self._bytes(chunk), "more_body": True}
            )
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _bytes(self, chunk: str | bytes | memoryview) -> bytes | memoryview:
        return chunk.encode(self.charset) if isinstance(chunk, str) else chunk
