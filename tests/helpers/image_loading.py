"""Shared pieces of the image-loading tests: limits, small encoded images, error probes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ocula.multimodal.image_fetching import fetch_image_bytes, make_http_client
from ocula.multimodal.image_loading import ImageError, ImageLimits, ImageSource

LIMITS = ImageLimits()
LOCAL = ImageLimits(allow_local=True, timeout_s=2.0)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def gradient(width: int = 24, height: int = 16) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 10, y * 15, (x + y) * 5], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


def error_of(call, *args) -> ImageError:
    with pytest.raises(ImageError) as caught:
        call(*args)
    return caught.value


def status_of(call, *args) -> int:
    return error_of(call, *args).status


async def fetch(source: ImageSource, limits: ImageLimits) -> bytes:
    async with make_http_client() as client:
        return await fetch_image_bytes(source, limits, client)
