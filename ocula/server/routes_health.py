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
    stalled = engine.stalled_seconds()
    limit = state.args.engine_stall_timeout_s
    if engine.healthy and limit > 0 and stalled > limit:  # e.g. a rank stuck in a collective
        message = f"the engine has sent nothing for {stalled:.0f} s while requests wait on it"
        return JSONResponse({"status": "unhealthy", "message": message}, status_code=503)
    if engine.healthy:
        return JSONResponse({"status": "ok", "message": "Ok"})
    reason = engine.failure or "the engine is not ready"
    return JSONResponse({"status": "unhealthy", "message": reason}, status_code=503)


@router.api_route("/health", methods=["GET", "HEAD"])
async def health(request: Request) -> JSONResponse:
    return _health(request)


@router.api_route("/ping", methods=["GET", "HEAD", "POST"])  # vLLM's (SageMaker's) probe
async def ping(request: Request) -> JSONResponse:
    return _health(request)


@router.api_route("/healthz", methods=["GET", "HEAD"])
async def healthz(request: Request) -> JSONResponse:
    return _health(request)


@router.api_route("/readiness", methods=["GET", "HEAD", "POST"])  # LightLLM takes POST too
async def readiness(request: Request) -> JSONResponse:
    return _health(request)


@router.api_route("/liveness", methods=["GET", "HEAD", "POST"])
async def liveness() -> JSONResponse:
    """The HTTP process answers; engine health is /health's business."""
    return JSONResponse({"status": "ok"})


@router.api_route("/metrics", methods=["GET", "HEAD"])
async def metrics(request: Request) -> Response:
    state = server_state(request)
    body = state.metrics.render(state.engine.stats)
    return Response(body, media_type=state.metrics.content_type)


@router.api_route("/get_model_name", methods=["GET", "HEAD", "POST"])
async def get_model_name(request: Request) -> JSONResponse:
    return JSONResponse({"model_name": server_state(request).engine.model_name})


@router.api_route("/token_load", methods=["GET", "HEAD"])
async def token_load(request: Request) -> JSONResponse:
    """LightLLM's load report for balancers, as fractions of the KV cache's tokens:
    `current_load` what running requests hold now (the prefix cache's evictable tokens count as
    free), `logical_max_load` and `dynamic_max_load` (equal here, as in LightLLM today) what the
    requests in flight would hold at their longest (prompt + max_new_tokens each)."""
    stats = server_state(request).engine.stats
    if stats is None or stats.kv_capacity == 0:
        current = promised = 0.0
    else:
        held = stats.kv_capacity - stats.kv_free - stats.prefix_cache_evictable
        current = max(held, 0) / stats.kv_capacity
        promised = max(held, stats.promised_tokens) / stats.kv_capacity
    return JSONResponse(
        {"current_load": current, "logical_max_load": promised, "dynamic_max_load": promised}
    )
