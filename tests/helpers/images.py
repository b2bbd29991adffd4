"""Test images."""

from __future__ import annotations

import io

import torch
from PIL import Image


def random_png(width: int, height: int, seed: int) -> bytes:
    """A PNG of seeded random pixels: lossless, so every decoder sees the same pixels."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, format="PNG")
    return buffer.getvalue()
