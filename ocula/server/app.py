"""The FastAPI application: routers, error handlers, the body-size limit, and the optional API key
and CORS, around one engine."""

from __future__ import annotations

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

import ocula
from ocula.server import routes_health, routes_lightllm, routes_openai, routes_vllm_tokens
from ocula.server.api_key import ApiKeyCheck
from ocula.server.args import ServerArgs
from ocula.server.async_engine import AsyncEngine
from ocula.server.body_limit import BodySizeLimit
from ocula.server.errors import install_error_handlers
from ocula.server.metrics import ServerMetrics
from ocula.server.serving import ServerState


def build_app(engine: AsyncEngine, args: ServerArgs) -> FastAPI:
    app = FastAPI(title="Ocula", version=ocula.__version__)
    limit = engine.ready.max_req_total_len if engine.ready else args.max_req_total_len
    metrics = ServerMetrics(engine.model_name, limit)
    engine.stats_listeners.append(metrics.observe_step)
    app.state.ocula = ServerState(engine, args, metrics)
    app.include_router(routes_health.router)
    app.include_router(routes_lightllm.router)
    app.include_router(routes_openai.router)
    app.include_router(routes_vllm_tokens.router)
    install_error_handlers(app)
    app.add_middleware(
        BodySizeLimit,
        max_bytes=int(args.max_request_body_mb * (1 << 20)),
        idle_timeout_s=args.request_body_timeout_s,
    )
    if args.api_key:
        app.add_middleware(ApiKeyCheck, api_key=args.api_key)
    if args.allowed_origins:  # outermost: a browser's preflight carries no key
        app.add_middleware(
            CORSMiddleware,
            allow_origins=args.allowed_origins,
            allow_methods=["*"],
            allow_headers=["*"],
        )
    return app
