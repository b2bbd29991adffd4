"""A request's image reference -> bytes -> decoded RGB image, with limits on every step.

Every failure raises `ImageError` with an HTTP status: 400 malformed input (bad base64, not an
image, truncated or undecodable image, unsupported reference), 413 too large (bytes or pixels),
422 unfetchable URL (DNS failure, refused connection, timeout, non-2xx, too many redirects, or an
address the policy refuses). Messages do not name the image; the caller prefixes its index.
The bytes of a reference, URLs fetched under the address policy: `image_fetching`.

Decoding is the InternVL reference's (`Image.open(...).convert("RGB")`, which LightLLM and vLLM
use too): the first frame of an animation, alpha dropped (not composited), EXIF orientation NOT
applied, so a model sees what it saw in training; 16-bit grayscale clipped at 255 as
`convert("RGB")` clips it (most such images come out white; 16-bit RGB keeps its high byte, as
PIL opens it).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from PIL import Image, UnidentifiedImageError

# Decoders Ocula lets PIL use on untrusted bytes (no EPS/PostScript, no exotic formats).
_WANTED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "HEIF")


class ImageError(Exception):
    """A client-caused image failure; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024  # encoded size, checked while streaming and after base64
    max_pixels: int = 40_000_000  # width * height, checked from the header before decoding
    timeout_s: float = 10.0  # whole URL fetch, all redirects included
    max_redirects: int = 3
    allow_local: bool = False  # True: skip the public-address check for every host
    allowed_hosts: tuple[str, ...] = ()  # host names (exact, any case) exempt from that check


@dataclass(frozen=True)
class ImageSource:
    """One image reference. kind "base64": `data` is the bare base64 payload; kind "url": an
    http(s) URL. Data URIs are turned into kind "base64" by `parse`."""

    kind: Literal["url", "base64"]
    data: str

    @classmethod
    def parse(cls, raw: Any) -> ImageSource:
        """Parse `{"type": "url"|"base64", "data": str}` (LightLLM's multimodal_params item)."""
        if not isinstance(raw, Mapping):
            raise ImageError("an image must be an object with 'type' and 'data'", 400)
        kind, data = raw.get("type"), raw.get("data")
        if kind not in ("url", "base64"):
            raise ImageError(f"image type must be 'url' or 'base64', got {kind!r}", 400)
        if not isinstance(data, str) or not data.strip():
            raise ImageError("image 'data' must be a non-empty string", 400)
        data = data.strip()
        if data[:5].lower() == "data:":
            return cls("base64", _data_uri_payload(data))
        return cls(kind, data)


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


# What str.split() drops in an ASCII string.
_ASCII_WHITESPACE = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"


def compact_base64(payload: str) -> str:
    """`payload` without whitespace; the same object when it has none (the usual case: no copy
    of a payload of megabytes)."""
    if payload.isascii() and not any(space in payload for space in _ASCII_WHITESPACE):
        return payload
    return "".join(payload.split())


def decode_base64(payload: str, limits: ImageLimits) -> bytes:
    """Strict standard base64 (whitespace ignored, missing '=' padding tolerated)."""
    compact = compact_base64(payload)
    if len(compact) // 4 * 3 > limits.max_bytes + 3:
        raise ImageError(f"image is larger than the limit of {limits.max_bytes} bytes", 413)
    try:
        data = base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"image data is not valid base64 ({exc})", 400) from exc
    if not data:
        raise ImageError("image data is empty", 400)
    if len(data) > limits.max_bytes:
        raise ImageError(f"image is larger than the limit of {limits.max_bytes} bytes", 413)
    return data


def decode_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Decode to an RGB image. The pixel count is read from the header and refused before any
    pixel is decoded; truncated files are errors (PIL's LOAD_TRUNCATED_IMAGES stays False)."""
    if len(data) > limits.max_bytes:
        raise ImageError(f"image is larger than the limit of {limits.max_bytes} bytes", 413)
    try:
        image = Image.open(io.BytesIO(data), formats=_allowed_formats())
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image has too many pixels ({exc})", 413) from exc
    except UnidentifiedImageError as exc:
        raise ImageError("data is not an image in a supported format", 400) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"malformed image header ({exc})", 400) from exc
    width, height = image.size
    if width * height > limits.max_pixels:
        raise ImageError(
            f"image is {width}x{height} = {width * height} pixels, "
            f"above the limit of {limits.max_pixels}",
            413,
        )
    try:
        image.load()  # decodes the first frame only
        return _to_rgb(image)
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image has too many pixels ({exc})", 413) from exc
    except Exception as exc:  # untrusted input: any decoder failure is the client's bad file
        raise ImageError(f"could not decode {image.format} image ({exc})", 400) from exc


def warm_image_decoders() -> None:
    """Registers PIL's format plugins and runs each common decoder once, at start-up: done by
    the first request instead, PIL's plugin imports alone took ~35 ms of its latency."""
    limits = ImageLimits()
    for format_name in ("JPEG", "PNG", "WEBP"):
        if format_name not in _allowed_formats():
            continue
        buffer = io.BytesIO()
        try:  # a Pillow built without a codec can open its files but not write them
            Image.new("RGB", (16, 16), (128, 64, 32)).save(buffer, format=format_name)
            decode_image(buffer.getvalue(), limits)
        except (OSError, KeyError, ValueError, ImageError):
            continue


@functools.cache
def _allowed_formats() -> tuple[str, ...]:
    Image.init()  # registers every installed plugin (AVIF/HEIF only where available)
    return tuple(name for name in _WANTED_FORMATS if name in Image.OPEN)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        # Same RGB values as convert("RGB"), without PIL's palette-transparency warning.
        return image.convert("RGBA").convert("RGB")
    return image.convert("RGB")


def _data_uri_payload(uri: str) -> str:
    header, comma, payload = uri.partition(",")
    media_type, *params = header[5:].split(";")
    if not comma or "base64" not in (param.strip().lower() for param in params):
        raise ImageError("only base64 data URIs are supported (data:image/...;base64,...)", 400)
    if media_type and not media_type.strip().lower().startswith("image/"):
        raise ImageError(f"data URI media type must be image/*, got {media_type!r}", 400)
    return payload
