"""A request's image reference -> bytes -> decoded RGB image, with limits on every step.

Every failure raises `ImageError` with an HTTP status: 400 malformed input (bad base64, not an
image, truncated or undecodable image, unsupported reference), 413 too large (bytes or pixels),
422 unfetchable URL (DNS failure, refused connection, timeout, non-2xx, too many redirects, or an
address the policy refuses). Messages do not name the image; the caller prefixes its index.

Decoding follows the InternVL reference (`Image.open(...).convert("RGB")`): the first frame of an
animation, alpha dropped (not composited), and EXIF orientation NOT applied, so a model sees what
it saw in training. One deliberate difference: 16-bit grayscale is scaled to 8 bits (high byte, as
PIL does for 16-bit RGB), where `convert("RGB")` would clip every value above 255 to white.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import io
import ipaddress
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import numpy as np
from PIL import Image, UnidentifiedImageError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Decoders Ocula lets PIL use on untrusted bytes (no EPS/PostScript, no exotic formats).
_WANTED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "HEIF")
_SIXTEEN_BIT_GRAY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")


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


def make_http_client() -> httpx.AsyncClient:
    """A client fit for `fetch_image_bytes`: no proxies or settings from the environment (a proxy
    would bypass the address check) and no automatic redirects (each hop is checked here)."""
    return httpx.AsyncClient(trust_env=False, follow_redirects=False)


async def fetch_image_bytes(
    source: ImageSource, limits: ImageLimits, client: httpx.AsyncClient
) -> bytes:
    """The encoded image bytes (at most `limits.max_bytes`) of an inline or URL source."""
    if source.kind == "base64":
        return decode_base64(source.data, limits)
    try:
        return await asyncio.wait_for(_fetch_url(source.data, limits, client), limits.timeout_s)
    except asyncio.TimeoutError as exc:
        message = f"fetching {source.data} timed out after {limits.timeout_s:g}s"
        raise ImageError(message, 422) from exc


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


def address_is_public(address: IPAddress) -> bool:
    """False for loopback, private, link-local, multicast, reserved, unspecified and other
    non-global addresses, including IPv4 addresses embedded in IPv6 (mapped, 6to4, Teredo,
    NAT64)."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address_is_public(address.ipv4_mapped)
        embedded = [address.sixtofour, address.teredo[1] if address.teredo else None]
        if address in _NAT64_PREFIX:
            embedded.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        if any(ip is not None and not address_is_public(ip) for ip in embedded):
            return False
    refused = (
        address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )
    return not refused and address.is_global


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
    if image.mode in _SIXTEEN_BIT_GRAY_MODES:
        high_byte = (np.clip(np.asarray(image), 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(high_byte).convert("RGB")
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


async def _fetch_url(url_text: str, limits: ImageLimits, client: httpx.AsyncClient) -> bytes:
    try:
        url = httpx.URL(url_text)
    except httpx.InvalidURL as exc:
        raise ImageError(f"invalid image URL ({exc})", 400) from exc
    if url.scheme not in ("http", "https") or not url.host:
        raise ImageError(f"image URL must be http(s)://host/..., got {url_text!r}", 400)
    try:
        for _ in range(limits.max_redirects + 1):
            addresses = await _checked_addresses(url, limits)
            async with _pinned_get(client, url, addresses, limits) as response:
                if response.is_redirect:
                    url = url.join(response.headers["location"])
                    if url.scheme not in ("http", "https"):
                        raise ImageError(f"redirected to a non-http(s) URL: {url}", 422)
                    continue
                if not response.is_success:
                    raise ImageError(f"fetching {url} failed: HTTP {response.status_code}", 422)
                return await _read_capped(response, limits.max_bytes)
    except httpx.TimeoutException as exc:
        raise ImageError(f"fetching {url} timed out after {limits.timeout_s:g}s", 422) from exc
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise ImageError(f"fetching {url} failed ({type(exc).__name__}: {exc})", 422) from exc
    raise ImageError(f"fetching {url_text} took more than {limits.max_redirects} redirects", 422)


async def _checked_addresses(url: httpx.URL, limits: ImageLimits) -> list[IPAddress]:
    """Resolve the URL's host; refuse it unless every address passes the policy."""
    host = url.raw_host.decode("ascii")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ImageError(f"could not resolve the host of {url} ({exc})", 422) from exc
    addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))
    exempt = limits.allow_local or host.lower() in {h.lower() for h in limits.allowed_hosts}
    for address in addresses:
        if not exempt and not address_is_public(address):
            raise ImageError(
                f"refused to fetch {url}: {host} resolves to the non-public address {address} "
                "(local and private addresses need --allow_local_media)",
                422,
            )
    return addresses


@asynccontextmanager
async def _pinned_get(
    client: httpx.AsyncClient, url: httpx.URL, addresses: list[IPAddress], limits: ImageLimits
) -> AsyncIterator[httpx.Response]:
    """GET `url` from the addresses already checked (in order, the next one on a refused
    connection), so a second DNS answer cannot swap in another address. The Host header and the
    TLS server name stay the URL's host, so virtual hosts and certificates work unchanged."""
    last_error: httpx.ConnectError | None = None
    for address in addresses:
        request = client.build_request(
            "GET",
            url.copy_with(host=str(address)),
            headers={"Host": url.netloc.decode("ascii")},
            extensions={"sni_hostname": url.raw_host.decode("ascii")},
            timeout=limits.timeout_s,
        )
        try:
            response = await client.send(request, stream=True, follow_redirects=False)
        except httpx.ConnectError as exc:
            last_error = exc
            continue
        try:
            yield response
        finally:
            await response.aclose()
        return
    raise ImageError(f"could not connect to {url} ({last_error})", 422)


async def _read_capped(response: httpx.Response, max_bytes: int) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise ImageError(f"image is {declared} bytes, above the limit of {max_bytes}", 413)
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > max_bytes:
            raise ImageError(f"image is larger than the limit of {max_bytes} bytes", 413)
    return bytes(body)
