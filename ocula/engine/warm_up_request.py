"""One synthetic request through the engine before it serves, so that the first real one is as
fast as the next.

Start-up compiles the kernels and captures the CUDA graphs, but the first request still met a
long tail of first uses: the tiling thread's first image (PIL's first crop and resize, torch's
first use from that thread), the first pinned copy of tiles to the device, the first
normalization and cast of pixels, the first embedding splice, the first prefill of a request
with an image, each CUDA kernel's module loaded on its first launch. The server's first image
answered in 487.5 ms on an H200 (2026-12-04) against ~25 ms for the next ones, and in ~60 ms
against ~25 ms on the CPU test machine.

`warm_up_engine` runs a request shaped like a typical one: a short prompt and, on a vision model
served with images, one image that the usual dynamic tiling makes two tiles plus a thumbnail (a
resize, crops, the thumbnail's resize), for two tokens (a prefill and a decode step). Then the
engine forgets it: its KV leaves the prefix cache, its embedding the image cache (the runner
drops it with the next plan), and the caches' counters and the ViT batch sizes start from zero,
so that metrics count only what clients sent.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator

import numpy as np
from PIL import Image

from ocula.engine.engine_core import EngineCore, RequestRejectedError
from ocula.engine.request import ImageSpan, Request
from ocula.multimodal.image_loading import md5_hex
from ocula.multimodal.image_processing import count_tiles
from ocula.multimodal.internvl_prompt import image_cache_key, tiling_for_request, tiling_from_config
from ocula.sampling.params import SamplingParams

logger = logging.getLogger(__name__)

WARM_UP_REQUEST_ID = "ocula-warm-up"
TEXT_TOKENS = 16  # prompt tokens around the image
NEW_TOKENS = 2  # a prefill and one decode step


def warm_up_engine(core: EngineCore, model_config: object, with_image: bool) -> float | None:
    """Runs the synthetic request to its end (with an image when `with_image` and the engine has
    a vision encoder), then clears what it left in the caches. Only on an engine with no request
    yet. Where the limits (KV, request length, image pool) refuse it, a smaller one runs: an
    image of one tile, then text alone; None, and nothing runs, when even that is refused.
    Returns the seconds it took."""
    if core.has_work():
        raise RuntimeError("the warm-up request needs an idle engine")
    started = time.perf_counter()
    for request in _candidates(core, model_config, with_image):
        try:
            core.add_request(request)
        except RequestRejectedError:
            continue
        while core.has_work():
            core.step()
            core.release_finished()
        core.forget_cached_state()
        seconds = time.perf_counter() - started
        logger.info(
            "warm-up request (%d prompt tokens, %d image tokens) took %.2f s",
            request.num_prompt_tokens,
            sum(span.length for span in request.images),
            seconds,
        )
        return seconds
    logger.warning("no warm-up request fits this engine's limits; the first request pays it")
    return None


def _candidates(core: EngineCore, model_config: object, with_image: bool) -> Iterator[Request]:
    params = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    text = list(range(1, TEXT_TOKENS + 1))
    if with_image and core.images is not None:
        for wide in (True, False):
            span = synthetic_image_span(model_config, offset=TEXT_TOKENS // 2, wide=wide)
            prompt = text[: span.offset] + [0] * span.length + text[span.offset :]
            yield Request(WARM_UP_REQUEST_ID, prompt, params, frozenset(), images=[span])
    yield Request(WARM_UP_REQUEST_ID, text, params, frozenset())


def synthetic_image_span(model_config: object, offset: int, wide: bool = True) -> ImageSpan:
    """A noisy image one tile high and, when `wide`, 1.75 tiles wide: dynamic tiling with room
    for two tiles (the checkpoint's, without a request's cap) makes that two tiles, resized
    first, plus a thumbnail. Else one tile, square."""
    tiling = tiling_for_request(tiling_from_config(model_config), None)
    width, height = synthetic_image_size(tiling.image_size, wide)
    data = noise_image(width, height)
    tiles = count_tiles(width, height, tiling)
    return ImageSpan(
        key=image_cache_key(md5_hex(data), (width, height), tiling),
        offset=offset,
        length=tiles * model_config.tokens_per_tile,  # type: ignore[attr-defined]
        image_bytes=data,
        tiling=tiling,
    )


def synthetic_image_size(tile_side: int, wide: bool = True) -> tuple[int, int]:
    """(width, height) of the warm-up's image: see `synthetic_image_span`."""
    return (tile_side * 7 // 4 if wide else tile_side), tile_side


def noise_image(width: int, height: int) -> bytes:
    """A JPEG of random pixels, as much work to decode as a photo of its size; a PNG where this
    Pillow cannot write JPEG (it may still read it, and serve the other formats)."""
    image = Image.fromarray(
        np.random.default_rng(0).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    )
    buffer = io.BytesIO()
    try:
        image.save(buffer, format="JPEG", quality=90)
    except (OSError, KeyError):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
    return buffer.getvalue()
