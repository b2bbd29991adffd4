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
from ocula.multimodal.internvl_prompt import VisionSpec, build_image_prompt, count_image_tags
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
        if not parsed:
            return []
        loads = [
            asyncio.ensure_future(load_image(s, self.limits, self.client, self.known_sizes, tiling))
            for s in parsed
        ]
        try:
            await asyncio.wait(loads, return_when=asyncio.FIRST_EXCEPTION)
        finally:  # one failed, or this request was cancelled: the other fetches are moot
            for load in loads:
                load.cancel()
            await asyncio.gather(*loads, return_exceptions=True)
        for index, load in enumerate(loads):
            error = None if load.cancelled() else load.exception()
            if isinstance(error, ImageError):
                raise ImageError(f"image {index}: {error.message}", error.status)
            if error is not None:
                raise error
        return [load.result() for load in loads]

    async def tokenize(
        self,
        text: str,
        sources: list[Any],
        max_tiles: int | None,
        add_special_tokens: bool,
    ) -> tuple[list[int], list[ImageSpan]]:
        """Token ids of `text` with its image tags expanded, and the images' spans. Raises
        ValueError when tags and images do not match (checked before any fetch), ImageError
        for an image that cannot be used."""
        tags = count_image_tags(text)
        if tags != len(sources):
            raise ValueError(
                f"the prompt has {tags} image tag(s) (<img></img> or <image>) but the request "
                f"has {len(sources)} image(s); they must match one to one"
            )
        images = await self.load(sources, self.vision.tiling_for(max_tiles))
        return await off_loop_if_long(
            text,
            build_image_prompt,
            text,
            images,
            self.vision,
            self.tokenizer,
            max_tiles,
            add_special_tokens,
        )

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
