"""Turning a cache-missed image span into pixel values, in the engine process."""

from __future__ import annotations

import torch

from ocula.engine.request import ImageSpan
from ocula.multimodal.image_loading import ImageLimits, decode_base64, decode_image
from ocula.multimodal.image_processing import tile_pixels

# The front already checked the bytes against the request's limits; no new limit applies here.
_NO_LIMITS = ImageLimits(max_bytes=1 << 62, max_pixels=1 << 62)


def preprocess_span(span: ImageSpan) -> torch.Tensor:
    """The span's tiles, uint8 [tiles, 3, S, S] (`tile_pixels`): the image encoder normalizes
    them on its device (`normalize_pixels`)."""
    data = span.image_bytes
    if data is None and span.image_base64 is not None:
        data = decode_base64(span.image_base64, _NO_LIMITS)
    if data is None or span.tiling is None:
        raise ValueError(f"image {span.key} has no bytes or tiling to preprocess")
    return tile_pixels(decode_image(data, _NO_LIMITS), span.tiling)
