"""Health probes, Prometheus metrics and model identity."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from ocula.server.serving import server_state

router = APIRouter()


def _health(request: Request) -> JSONResponse:
    state = server_state(request)
    engine = state.engine
    if state.draining:  # load balancers stop sending requests; /liveness still answers
        message = "the server is shutting down"
        return JSONResponse({"status": "shutting_down", "message": message}, status_code=503)
    if engine.healthy:
        return JSONResponse({"status": "ok", "message": "Ok"})
    reason = engine.failure or "the engine is not ready"
    return JSONResponse({"status": "unhealthy", "message": reason}, status_code=503)


@router.api_route("/health", methods=["GET", "HEAD"])
async def health(request: Request) -> JSONResponse:
    return _health(request)


@router.api_route("/healthz", methods=["GET", "HEAD"])
async def healthz(request: Request) -> JSONResponse:
    return _health(request)


@router.api_route("/readiness", methods=["GET", "HEAD"])
async def readiness(request: Request) -> JSONResponse:
    return _health(request)


@router.api_route("/liveness", methods=["GET", "HEAD"])
async def liveness() -> JSONResponse:
    """The HTTP process answers; engine health is /health's business."""
    return JSONResponse({"status": "ok"})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    state = server_state(request)
    body = state.metrics.render(state.engine.stats)
    return Response(body, media_type=state.metrics.content_type)


@router.get("/get_model_name")
async def get_model_name(request: Request) -> JSONResponse:
    return JSONResponse({"model_name": server_state(request).engine.model_name})
