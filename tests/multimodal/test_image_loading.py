"""Image references -> bytes -> RGB images: formats, malformed input, size limits, base64 and
data URIs. URL fetching: test_image_fetching.py; `load_image` and the front's memory of the
images it has seen: test_loaded_images.py."""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from ocula.multimodal.image_loading import (
    ImageLimits,
    ImageSource,
    decode_image,
)
from tests.helpers.image_loading import LIMITS, encode, fetch, gradient, status_of


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
    )


def sixteen_bit_rgb_png(pixels: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG written by hand (PIL cannot save one)."""
    height, width, _ = pixels.shape
    rows = b"".join(b"\x00" + pixels[row].astype(">u2").tobytes() for row in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def with_declared_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    start = data.index(b"\xff\xc0")  # baseline SOF: marker, length, precision, height, width
    return data[: start + 5] + struct.pack(">HH", height, width) + data[start + 9 :]


def with_declared_png_size(data: bytes, width: int, height: int) -> bytes:
    header = struct.pack(">II", width, height) + data[24:29]
    return data[:8] + png_chunk(b"IHDR", header) + data[33:]


# ---------------------------------------------------------------- decoding


@pytest.mark.parametrize("fmt,options", [("PNG", {}), ("WEBP", {"lossless": True}), ("BMP", {})])
def test_lossless_formats_decode_exactly(fmt, options):
    original = gradient()
    decoded = decode_image(encode(original, fmt, **options), LIMITS)
    assert decoded.mode == "RGB"
    assert np.array_equal(np.asarray(decoded), np.asarray(original))


def test_jpeg_decodes_like_pil():
    data = encode(gradient(), "JPEG", quality=95)
    decoded = np.asarray(decode_image(data, LIMITS)).astype(int)
    assert np.array_equal(decoded, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    assert np.abs(decoded - np.asarray(gradient()).astype(int)).max() < 24


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (8, 8), color) for color in [(255, 0, 0), (0, 0, 255)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert np.all(np.asarray(decode_image(data, LIMITS)) == [255, 0, 0])


def test_sixteen_bit_images_decode_as_the_reference_does():
    """Gray: clipped at 255 by convert("RGB"), as the InternVL reference, LightLLM and vLLM
    decode it; RGB: the high byte, as PIL opens it."""
    values = np.arange(0, 65536, 4096, dtype=np.uint16).reshape(4, 4)
    values[0] = [0, 100, 255, 256]
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    gray = np.asarray(decode_image(data, LIMITS))
    assert np.array_equal(gray, np.repeat(np.minimum(values, 255)[..., None], 3, axis=-1))
    rgb16 = np.stack([values, 65535 - values, np.full_like(values, 0x1234)], axis=-1)
    rgb = decode_image(sixteen_bit_rgb_png(rgb16), LIMITS)
    assert np.array_equal(np.asarray(rgb), (rgb16 >> 8).astype(np.uint8))


def test_cmyk_jpeg_converts_to_rgb():
    data = encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=100)
    decoded = np.asarray(decode_image(data, LIMITS)).astype(int)
    assert np.abs(decoded - [255, 0, 0]).max() <= 3


def test_palette_with_transparency_and_alpha_modes():
    palette = Image.new("P", (4, 1))
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.putdata([0, 1, 0, 1])
    data = encode(palette, "PNG", transparency=0)
    assert np.array_equal(
        np.asarray(decode_image(data, LIMITS))[0], [[10, 20, 30], [200, 100, 50]] * 2
    )
    rgba = Image.new("RGBA", (2, 2), (40, 50, 60, 0))  # alpha dropped, not composited
    assert np.all(np.asarray(decode_image(encode(rgba, "PNG"), LIMITS)) == [40, 50, 60])
    la = Image.new("LA", (2, 2), (77, 128))
    assert np.all(np.asarray(decode_image(encode(la, "PNG"), LIMITS)) == 77)
    gray = Image.new("L", (2, 2), 99)
    assert np.all(np.asarray(decode_image(encode(gray, "PNG"), LIMITS)) == 99)


def test_exif_orientation_is_not_applied_like_the_reference():
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    data = encode(gradient(24, 16), "JPEG", exif=exif)
    assert decode_image(data, LIMITS).size == (24, 16)


def test_malformed_images_are_400():
    assert status_of(decode_image, b"hello, this is not an image", LIMITS) == 400
    png = encode(gradient(64, 64), "PNG")
    assert status_of(decode_image, png[: len(png) // 2], LIMITS) == 400
    jpeg = encode(gradient(64, 64), "JPEG")
    assert status_of(decode_image, jpeg[: len(jpeg) // 2], LIMITS) == 400
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    # EPS is never handed to PIL (its decoder runs Ghostscript).
    assert (
        status_of(decode_image, b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 1 1\n", LIMITS) == 400
    )


def test_pixel_bombs_are_refused_from_the_header(monkeypatch):
    jpeg = encode(gradient(8, 8), "JPEG")
    png = encode(gradient(8, 8), "PNG")
    bombs = [
        with_declared_jpeg_size(jpeg, 30000, 30000),  # above PIL's own bomb limit
        with_declared_jpeg_size(jpeg, 8000, 8000),  # above ours (40 MP), below PIL's
        with_declared_png_size(png, 7000, 7000),
    ]

    def refuse_to_decode(self):
        raise AssertionError("pixels were decoded before the size check")

    # Any decode would raise inside the guarded block and come out as 400, so 413 proves the
    # refusal came from the header alone.
    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse_to_decode)
    monkeypatch.setattr(Image.Image, "load", refuse_to_decode)
    for bomb in bombs:
        assert status_of(decode_image, bomb, LIMITS) == 413
    assert status_of(decode_image, png, ImageLimits(max_pixels=63)) == 413
    assert status_of(decode_image, png, LIMITS) == 400  # the spy works


def test_byte_limit():
    data = encode(gradient(), "PNG")
    assert status_of(decode_image, data, ImageLimits(max_bytes=len(data) - 1)) == 413
    payload = base64.b64encode(data).decode()
    source = ImageSource.parse({"type": "base64", "data": payload})
    limits = ImageLimits(max_bytes=len(data) - 1)
    assert status_of(lambda: asyncio.run(fetch(source, limits))) == 413


# ---------------------------------------------------------------- inline sources


def test_base64_and_data_uris():
    data = encode(gradient(), "PNG")
    payload = base64.b64encode(data).decode()
    wrapped = "\n".join(payload[i : i + 76] for i in range(0, len(payload), 76))
    for raw in [
        {"type": "base64", "data": payload},
        {"type": "base64", "data": wrapped},
        {"type": "base64", "data": payload.rstrip("=")},
        {"type": "base64", "data": "data:image/png;base64," + payload},
        {"type": "url", "data": "data:image/png;base64," + payload},
        {"type": "url", "data": "DATA:;base64," + payload},
    ]:
        assert asyncio.run(fetch(ImageSource.parse(raw), LIMITS)) == data


def test_bad_references_are_400():
    bad = [
        "not a dict",
        {"type": "file", "data": "/etc/passwd"},
        {"type": "base64"},
        {"type": "base64", "data": "   "},
        {"type": "url", "data": "data:image/png,rawbytes"},
        {"type": "base64", "data": "data:text/plain;base64,aGVsbG8="},
    ]
    for raw in bad:
        assert status_of(ImageSource.parse, raw) == 400
    for payload in ["not base64!!", "ab$d", "a", "éé=="]:
        source = ImageSource.parse({"type": "base64", "data": payload})
        assert status_of(lambda s=source: asyncio.run(fetch(s, LIMITS))) == 400
    for url in ["file:///etc/passwd", "ftp://example.com/a.png", "http:///nohost"]:
        source = ImageSource.parse({"type": "url", "data": url})
        assert status_of(lambda s=source: asyncio.run(fetch(s, LIMITS))) == 400
