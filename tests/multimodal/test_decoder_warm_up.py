"""warm_image_decoders: PIL's plugins are registered at start-up, and a codec that cannot write
its format does not stop the server from starting."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from ocula.multimodal import image_loading
from ocula.multimodal.image_loading import warm_image_decoders


def test_warm_up_registers_every_plugin() -> None:
    warm_image_decoders()
    assert Image._initialized == 2  # Image.init() ran: every installed plugin is registered
    assert {"JPEG", "PNG"} <= set(image_loading._allowed_formats())


def test_a_codec_that_cannot_save_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[str] = []
    refused: list[str] = []
    real_save = Image.Image.save
    real_decode = image_loading.decode_image

    def save(self, fp, format=None, **params):
        if format == "WEBP":
            refused.append(format)
            raise OSError("encoder webp not available")
        return real_save(self, fp, format=format, **params)

    def decode(data, limits):
        image = real_decode(data, limits)
        decoded.append(Image.open(io.BytesIO(data)).format)
        return image

    monkeypatch.setattr(Image.Image, "save", save)
    monkeypatch.setattr(image_loading, "decode_image", decode)
    monkeypatch.setattr(image_loading, "_allowed_formats", lambda: ("JPEG", "PNG", "WEBP"))
    warm_image_decoders()
    assert refused == ["WEBP"]
    assert decoded == ["JPEG", "PNG"]
