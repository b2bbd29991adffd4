"""`--api_key`: the OpenAI routes (`/v1/...`) answer only requests that carry
`Authorization: Bearer <key>`, as vLLM's `--api-key` does; LightLLM's routes, the probes and
/metrics stay open."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from ocula.server.errors import error_response

PROTECTED_PREFIX = "/v1"


class ApiKeyCheck:
    """Pure ASGI middleware; a request without the key gets 401 before its body is read."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _protected(scope) or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            await self.app(scope, receive, send)
            return
        response = error_response(
            401, "a valid API key is needed: Authorization: Bearer <key>", "authentication_error"
        )
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)


def _protected(scope: Scope) -> bool:
    path: str = scope["path"]
    return path == PROTECTED_PREFIX or path.startswith(PROTECTED_PREFIX + "/")
