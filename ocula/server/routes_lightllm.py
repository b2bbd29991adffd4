"""LightLLM's native API: `POST /generate`, `POST /generate_stream`, `POST /` (either, by the
body's `stream`) and `/tokens` (GET or POST, as LightLLM takes it).

What the parameters mean is in protocol_lightllm. Here:
- every body is read as JSON whatever its Content-Type, as LightLLM does (`json_body`);
- `/generate` answers once every sequence is done; its `tokens` (with `return_details`) cost a
  log-softmax per step, so logprobs are only computed when asked for;
- `/generate_stream` sends one SSE event per token and refuses n > 1; every error found before
  the first token (bad parameters, prompt too long, engine refusal, overload) is a 4xx/503 JSON
  answer, never a broken stream;
- a client that leaves aborts its request, which frees its KV cache;
- `/tokens` counts the prompt's tokens exactly as `/generate` tokenizes it.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from ocula import env
from ocula.engine.request import ImageSpan
from ocula.server import serving
from ocula.server.async_engine import (
    AsyncEngine,
    PreparedRequest,
    RequestError,
)
from ocula.server.eager_streaming import EagerStreamingResponse
from ocula.server.json_body import read_body
from ocula.server.lightllm_responses import DetailWriter, generate_response, stream_events
from ocula.server.lightllm_sampling import fit_max_new_tokens, to_sampling_params
from ocula.server.protocol_lightllm import GenerateRequest, MultimodalParams, TokensRequest
from ocula.server.routes_openai_common import context_limit
from ocula.server.text_encoding import check_token_budget_off_loop, encode_text

router = APIRouter()

# nginx's status for "the client closed the connection before the answer".


Body = TypeVar("Body", bound=BaseModel)


# -- request preparation -----------------------------------------------------------------------
# LightLLM's tile cap per image when neither the request nor MAX_PATCH_NUM sets one, by the
# request's number of images (more images: fewer tiles each); one image keeps the checkpoint's.
SEVERAL_IMAGES_TILES = 6  # for 2 to SEVERAL_IMAGES images (never above the checkpoint's cap)
SEVERAL_IMAGES = 6
MANY_IMAGES_TILES = 1  # beyond: one tile each, the image resized to it


def lightllm_tile_cap(requested: int | None, num_images: int, checkpoint_cap: int) -> int | None:
    """The tile cap of each image of a LightLLM request (None: the MAX_PATCH_NUM environment
    value, else the checkpoint's): the request's when above 0, as LightLLM's InternVL tokenizer
    picks it."""
    if requested is not None and requested > 0:
        return requested
    if env.max_patch_num() is not None or num_images <= 1:
        return None
    if num_images <= SEVERAL_IMAGES:
        return min(SEVERAL_IMAGES_TILES, checkpoint_cap)
    return MANY_IMAGES_TILES


async def tokenize_with_images(
    engine: AsyncEngine,
    inputs: str | list[int],
    multimodal: MultimodalParams,
    max_tiles: int | None,
    add_special_tokens: bool,
) -> tuple[list[int], list[ImageSpan]]:
    """The prompt's token ids, with each `<img></img>` expanded to its image's placeholders.
    Raises RequestError (400) or ImageError (4xx)."""
    if multimodal.audios:
        raise RequestError("multimodal_params.audios: this server's models take no audio")
    if not multimodal.images:
        if isinstance(inputs, str):
            budget = engine.max_prompt_tokens
            return await encode_text(engine.tokenizer, inputs, add_special_tokens, budget), []
        return tokenize_inputs(engine, inputs, add_special_tokens), []
    reason = engine.image_support_error()
    if reason is not None:
        raise RequestError(f"multimodal_params.images: {reason}")
    if not isinstance(inputs, str):
        raise RequestError("inputs: with images, inputs must be text holding <img></img> tags")
    assert engine.images is not None
    await check_token_budget_off_loop(engine.tokenizer, inputs, engine.max_prompt_tokens)
    sources = [image.model_dump() for image in multimodal.images]
    max_tiles = lightllm_tile_cap(max_tiles, len(sources), engine.images.vision.tiling.max_num)
    try:
        ids, spans = await engine.images.tokenize(inputs, sources, max_tiles, add_special_tokens)
    except ValueError as error:
        raise RequestError(str(error)) from None
    if multimodal.skip_image_cache:  # keys no other request has: no cache entry is shared
        spans = [dataclasses.replace(span, key=f"{span.key}:{uuid.uuid4().hex}") for span in spans]
    return ids, spans


def tokenize_inputs(
    engine: AsyncEngine, inputs: str | list[int], add_special_tokens: bool
) -> list[int]:
    """The prompt's token ids as /generate and /tokens see them."""
    if isinstance(inputs, str):
        return engine.tokenizer.encode(inputs, add_special_tokens=add_special_tokens)
    return list(inputs)


async def prepare_request(
    state: serving.ServerState,
    body: GenerateRequest,
    want_logprobs: bool,
    score_prompt: bool = False,
) -> PreparedRequest:
    """Checks, tokenizes and resolves a request; raises RequestError (400) or ImageError."""
    engine = state.engine
    params = to_sampling_params(
        body.parameters,
        engine.tokenizer,
        engine.model_config.vocab_size,
        engine.generation_config,
        want_logprobs,
    )
    if score_prompt:  # --return_all_prompt_logprobs, LightLLM's mode for perplexity
        params = dataclasses.replace(params, prompt_logprobs=0)
    prompt_ids, images = await tokenize_with_images(
        engine,
        body.inputs,
        body.multimodal_params,
        body.parameters.image_max_patch_num,
        body.parameters.add_special_tokens,
    )
    max_new_tokens = fit_max_new_tokens(
        body.parameters.max_new_tokens, len(prompt_ids), context_limit(state)
    )
    params = dataclasses.replace(
        params,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min(params.min_new_tokens, max_new_tokens),
    )
    prepared = engine.prepare(prompt_ids, params, images)
    if isinstance(body.inputs, str):
        prepared = dataclasses.replace(prepared, prompt=body.inputs)
    return prepared


# -- routes ------------------------------------------------------------------------------------
@router.post("/generate")
async def generate(request: Request) -> Response:
    return await _generate(request, await read_body(request, GenerateRequest))


@router.post("/generate_stream")
async def generate_stream(request: Request) -> EagerStreamingResponse:
    return await _generate_stream(request, await read_body(request, GenerateRequest))


@router.post("/")
async def compat_generate(request: Request) -> Response:
    """LightLLM's catch-all: /generate_stream when the body says `"stream": true`, else
    /generate."""
    body = await read_body(request, GenerateRequest)
    if body.stream:
        return await _generate_stream(request, body)
    return await _generate(request, body)


async def _generate(request: Request, body: GenerateRequest) -> Response:
    state = serving.server_state(request)
    details = body.parameters.return_details
    score = state.args.return_all_prompt_logprobs  # /generate alone answers with them
    prepared = await serving.prepare_admitted(
        request,
        state,
        body.parameters.num_sequences,
        lambda: prepare_request(state, body, want_logprobs=details, score_prompt=score),
    )
    if not details:  # `tokens` (return_details) hold each token's text
        prepared = dataclasses.replace(prepared, text_at_end=True)
    request_id = state.new_request_id("generate")
    events = serving.run_request(state, request_id, prepared)
    collected = await serving.collect_unless_disconnected(request, events)
    return JSONResponse(generate_response(collected, prepared, state.engine.tokenizer, details))


async def _generate_stream(request: Request, body: GenerateRequest) -> EagerStreamingResponse:
    state = serving.server_state(request)
    if body.parameters.num_sequences > 1:
        raise RequestError(
            f"parameters.n: /generate_stream returns one sequence; got n="
            f"{body.parameters.num_sequences} (use /generate for several)"
        )
    prepared = await serving.prepare_admitted(
        request, state, 1, lambda: prepare_request(state, body, want_logprobs=True)
    )
    request_id = state.new_request_id("generate")
    # Errors up to the first token (admission, engine refusal) raise here, before any byte.
    events = await serving.primed_unless_disconnected(
        request, serving.run_request(state, request_id, prepared)
    )
    writer = DetailWriter(state.engine.tokenizer, len(prepared.prompt_token_ids))
    return EagerStreamingResponse(stream_events(events, writer), media_type="text/event-stream")


@router.api_route("/tokens", methods=["GET", "POST"])  # LightLLM takes both
async def tokens(request: Request) -> JSONResponse:
    body = await read_body(request, TokensRequest)
    state = serving.server_state(request)
    ids, _ = await serving.prepare_admitted(  # images load as a generation's would
        request,
        state,
        0,
        lambda: tokenize_with_images(
            state.engine,
            body.text,
            body.multimodal_params,
            body.parameters.image_max_patch_num,
            body.parameters.add_special_tokens,
        ),
    )
    return JSONResponse({"ntokens": len(ids)})
