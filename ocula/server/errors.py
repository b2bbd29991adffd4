"""Every error leaves the server as JSON `{"error": {"message", "type", "code"}}` with a 4xx that
fits (5xx only for the server's own faults), on every route, streaming ones included. Bodies
made here (all but the OpenAI routes' own errors) also hold the message at their top level, where
LightLLM's clients read it (LightLLM answers `{"message": ...}`)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ocula.multimodal.image_loading import ImageError
from ocula.server.async_engine import EngineUnavailableError, RequestError

logger = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 1
# The error `type` of an image that cannot be used, by status ("invalid_image" otherwise).
IMAGE_ERROR_TYPES = {413: "image_too_large", 422: "image_unfetchable"}


class ServerShuttingDownError(EngineUnavailableError):
    """The server is shutting down: new requests are refused, and those still running when the
    grace period ends are stopped (HTTP 503, or a last error event on a started stream)."""

    error_type = "server_shutting_down"


class OverloadedError(RuntimeError):
    """More requests are waiting than --max_waiting_requests allows (HTTP 503 + Retry-After)."""


class ClientDisconnectedError(Exception):
    """The client left before its answer was ready; the request has been aborted."""


CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that closed the connection


def error_body(status: int, message: str, error_type: str) -> dict:
    """The JSON body of an error answer (the OpenAI routes' own errors aside)."""
    return {"error": {"message": message, "type": error_type, "code": status}, "message": message}


def error_response(
    status: int, message: str, error_type: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        error_body(status, message, error_type), status_code=status, headers=headers
    )


def describe_validation_error(error: RequestValidationError) -> str:
    """One readable line per problem, e.g. `parameters.temperature: Input should be ...`."""
    lines = []
    for item in error.errors():
        location = ".".join(str(part) for part in item.get("loc", ()) if part != "body")
        if item.get("type") == "json_invalid":
            lines.append(f"the body is not valid JSON: {item.get('ctx', {}).get('error', '')}")
        elif location:
            lines.append(f"{location}: {item.get('msg')}")
        else:
            lines.append(str(item.get("msg")))
    return "; ".join(lines) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(400, describe_validation_error(error), "invalid_request_error")

    @app.exception_handler(RequestError)
    async def _bad_request(_: Request, error: RequestError) -> JSONResponse:
        return error_response(400, str(error), "invalid_request_error")

    @app.exception_handler(ImageError)
    async def _image(_: Request, error: ImageError) -> JSONResponse:
        if error.status == 503:  # too many image fetches waiting: retry shortly
            headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}
            return error_response(503, error.message, "overloaded", headers)
        kind = IMAGE_ERROR_TYPES.get(error.status, "invalid_image")
        return error_response(error.status, error.message, kind)

    @app.exception_handler(OverloadedError)
    async def _overloaded(_: Request, error: OverloadedError) -> JSONResponse:
        return error_response(
            503, str(error), "overloaded", {"Retry-After": str(RETRY_AFTER_SECONDS)}
        )

    @app.exception_handler(ClientDisconnectedError)
    @app.exception_handler(ClientDisconnect)  # the client left while its body was being read
    async def _disconnected(_: Request, __: Exception) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)  # nobody reads it; no traceback

    @app.exception_handler(EngineUnavailableError)
    async def _unavailable(_: Request, error: EngineUnavailableError) -> JSONResponse:
        headers = None
        if isinstance(error, ServerShuttingDownError):  # retry elsewhere, or after the restart
            headers = {"Retry-After": str(RETRY_AFTER_SECONDS), "Connection": "close"}
        return error_response(503, str(error), error.error_type, headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(
            error.status_code, str(error.detail), "invalid_request_error", error.headers
        )

    @app.exception_handler(Exception)
    async def _internal(_: Request, error: Exception) -> JSONResponse:
        logger.exception("internal error")
        return error_response(500, f"internal error: {type(error).__name__}", "internal_error")
