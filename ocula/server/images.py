"""The front's part of serving images: fetch and check them, then expand the prompt's image tags.

An image the front decodes (to check it and learn its size) is cut into its tiles in the same
worker thread, and the tiles go to the engine with the request: a new image's tiles are ready
when the request arrives there, and the image is decoded once. An image the front has seen
before is not decoded again: the engine tiles its bytes if its embedding is no longer cached.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from typing import Any

from ocula.engine.request import ImageSpan
from ocula.engine.warm_up_request import noise_image, synthetic_image_size
from ocula.multimodal.image_fetching import make_http_client
from ocula.multimodal.image_loading import (
    ImageError,
    ImageLimits,
    ImageSource,
    warm_image_decoders,
)
from ocula.multimodal.image_processing import InternVLImageConfig
from ocula.multimodal.internvl_prompt import (
    VisionSpec,
    check_image_tags,
    expand_images,
    tokenize_compact,
)
from ocula.multimodal.loaded_images import KnownImageSizes, LoadedImage, load_image
from ocula.server.text_encoding import off_loop_if_long

logger = logging.getLogger(__name__)

MAX_IMAGES_PER_REQUEST = 16


class FrontImages:
    def __init__(self, vision: VisionSpec, tokenizer: Any, allow_local_media: bool) -> None:
        self.vision = vision
        self.tokenizer = tokenizer
        self.limits = ImageLimits(allow_local=allow_local_media)
        self.client = make_http_client()
        self.known_sizes = KnownImageSizes()
        warm_image_decoders()

    async def load(
        self, sources: list[Any], tiling: InternVLImageConfig | None = None
    ) -> list[LoadedImage]:
        """Fetches and decodes every image concurrently (and tiles with `tiling` those decoded).
        Raises ImageError (4xx) naming the index of an image that failed; the first failure
        cancels the fetches still running."""
        return await self._finish_loads(self._start_loads(sources, tiling))

    async def tokenize(
        self,
        text: str,
        sources: list[Any],
        max_tiles: int | None,
        add_special_tokens: bool,
    ) -> tuple[list[int], list[ImageSpan]]:
        """Token ids of `text` with its image tags expanded, and the images' spans. Raises
        ValueError when tags and images do not match (checked before any fetch) or the text
        holds placeholder tokens, ImageError for an image that cannot be used.

        The text is tokenized while the images load: a new image's decoding and tiling run in
        a worker thread, and only the expansion needs their sizes."""
        check_image_tags(text, len(sources))
        loads = self._start_loads(sources, self.vision.tiling_for(max_tiles))
        try:
            # One turn of the event loop: each load runs to its first wait (a new image's
            # decoding thread, a URL's fetch) before the tokenizer holds the loop.
            await asyncio.sleep(0)
            compact = await off_loop_if_long(
                text,
                tokenize_compact,
                text,
                len(sources),
                self.vision,
                self.tokenizer,
                add_special_tokens,
            )
        except BaseException:
            await _cancel(loads)
            raise
        images = await self._finish_loads(loads)
        return await off_loop_if_long(text, expand_images, compact, images, self.vision, max_tiles)

    def _start_loads(
        self, sources: list[Any], tiling: InternVLImageConfig | None
    ) -> list[asyncio.Future[LoadedImage]]:
        """One task per image, started; raises ImageError for a request with too many images or
        a source that is not an image reference."""
        if len(sources) > MAX_IMAGES_PER_REQUEST:
            raise ImageError(
                f"the request has {len(sources)} images; at most {MAX_IMAGES_PER_REQUEST} are "
                "allowed",
                413,
            )
        parsed = []
        for index, raw in enumerate(sources):
            try:
                parsed.append(ImageSource.parse(raw))
            except ImageError as error:
                raise ImageError(f"image {index}: {error.message}", error.status) from None
        return [
            asyncio.ensure_future(load_image(s, self.limits, self.client, self.known_sizes, tiling))
            for s in parsed
        ]

    async def _finish_loads(self, loads: list[asyncio.Future[LoadedImage]]) -> list[LoadedImage]:
        """The loaded images in order; the first failure (ImageError naming the image's index)
        cancels the loads still running."""
        if not loads:
            return []
        try:
            await asyncio.wait(loads, return_when=asyncio.FIRST_EXCEPTION)
        finally:  # one failed, or this request was cancelled: the other fetches are moot
            await _cancel(loads)
        for index, load in enumerate(loads):
            error = None if load.cancelled() else load.exception()
            if isinstance(error, ImageError):
                raise ImageError(f"image {index}: {error.message}", error.status)
            if error is not None:
                raise error
        return [load.result() for load in loads]

    async def warm_up(self) -> None:
        """Loads and expands one synthetic image prompt as a request would, then forgets the
        image: the first client image paid the decoding thread's start and the first uses on
        its path (~2 ms on the CPU test machine)."""
        size = synthetic_image_size(self.vision.tiling.image_size)
        picture = base64.b64encode(noise_image(*size)).decode()
        try:
            await self.tokenize("<image>", [{"type": "base64", "data": picture}], None, True)
        except Exception as error:  # only a speed-up: never a reason not to start
            logger.warning("the front's image warm-up failed: %s", error)
        self.known_sizes = KnownImageSizes()

    async def close(self) -> None:
        await self.client.aclose()


async def _cancel(loads: list[asyncio.Future[LoadedImage]]) -> None:
    """Cancels the loads not finished and waits for them to end (a worker thread's decoding
    runs on, its result dropped)."""
    for load in loads:
        load.cancel()
    await asyncio.gather(*loads, return_exceptions=True)
