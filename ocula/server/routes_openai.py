"""The OpenAI-compatible API: /v1/models here, chat and text completions in their own modules."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from ocula.server import routes_openai_chat, routes_openai_completions
from ocula.server.protocol_openai import ModelCard, ModelList
from ocula.server.routes_openai_common import check_model, context_limit, openai_endpoint
from ocula.server.serving import ServerState, server_state

router = APIRouter()
router.include_router(routes_openai_chat.router)
router.include_router(routes_openai_completions.router)


def model_card(state: ServerState) -> ModelCard:
    """The served model; `created` is when its folder was last written."""
    engine = state.engine
    created = int(engine.model_dir.stat().st_mtime)
    return ModelCard(id=engine.model_name, created=created, max_model_len=context_limit(state))


@router.api_route("/v1/models", methods=["GET", "HEAD"])
async def list_models(request: Request) -> JSONResponse:
    return JSONResponse(ModelList(data=[model_card(server_state(request))]).model_dump())


@router.api_route("/v1/models/{model_name:path}", methods=["GET", "HEAD"])
@openai_endpoint
async def retrieve_model(request: Request) -> Response:
    state = server_state(request)
    check_model(state, request.path_params["model_name"])
    return JSONResponse(model_card(state).model_dump())
