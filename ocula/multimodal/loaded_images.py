"""An image as the prompt builder sees it (bytes, MD5, size) and how the front loads one:
fetched or base64-decoded, hashed, and decoded once to be checked and measured, unless the
front's memory of sizes knows its bytes already. An image the front decodes is also cut into
its tiles in the same worker thread, when the request's tiling is given: the engine then
encodes them without decoding the image again (it still can, from the bytes)."""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from ocula.multimodal.image_fetching import ImageHttpClient, fetch_image_bytes
from ocula.multimodal.image_loading import (
    ImageLimits,
    ImageSource,
    compact_base64,
    decode_base64,
    decode_image,
    md5_hex,
)
from ocula.multimodal.image_processing import InternVLImageConfig, count_tiles, tile_pixels

# The most tiles the front sends with a request (602 KB each at 448 px): InternVL's default
# tiling of one image (12 and a thumbnail). Their frame crosses the engine channel beside its
# pickle (channel_frames.py) while the engine loop reads it: 13 tiles (7.8 MB) took 2.5 ms from
# the front's send to the engine's answer on an H100 host, 2.2-3.0 ms on the 2-core CPU machine
# (26 and 30 ms when tensors were pickled in band). An image of more tiles (a request's own
# larger cap) goes as its bytes, tiled in the engine's worker threads off the engine loop.
MAX_FRONT_TILES = 13


class KnownImageSizes:
    """Sizes of images that decoded within the limits before, by SHA-256 of their bytes, and the
    MD5, size and SHA-256 of the bytes each base64 payload seen before decoded to, by SHA-256 of
    the payload (whitespace removed); most recent last (LRU).

    An image sent again (a follow-up question about it, the same picture in many requests) is
    not decoded again in the front: the engine's caches hold its embedding, so its size is all
    the prompt needs. Identical bytes decode identically; the limits are the server's, fixed.
    A base64 payload sent again is not even base64-decoded or hashed as bytes (~2 ms of the
    event loop for a 600 KB image): the request carries the payload, which the engine decodes
    only if its caches miss. Keyed by SHA-256, not by the caches' MD5: MD5 collisions can be
    forged, and a forged twin of a known image must still be decoded and checked before the
    engine sees it.
    """

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._sizes: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self._payloads: OrderedDict[str, tuple[str, tuple[int, int], str]] = OrderedDict()

    def get(self, digest: str) -> tuple[int, int] | None:
        return _lru_get(self._sizes, digest)

    def put(self, digest: str, size: tuple[int, int]) -> None:
        _lru_put(self._sizes, digest, size, self.capacity)

    def payload(self, digest: str) -> tuple[str, tuple[int, int], str] | None:
        """(MD5 of the bytes, size, SHA-256 of the bytes) of the payload whose SHA-256 is
        `digest`, if seen."""
        return _lru_get(self._payloads, digest)

    def put_payload(self, digest: str, md5: str, size: tuple[int, int], sha256: str) -> None:
        _lru_put(self._payloads, digest, (md5, size, sha256), self.capacity)

    def __len__(self) -> int:
        return len(self._sizes)


def _lru_get(entries: OrderedDict, key: str) -> Any:
    value = entries.get(key)
    if value is not None:
        entries.move_to_end(key)
    return value


def _lru_put(entries: OrderedDict, key: str, value: Any, capacity: int) -> None:
    entries[key] = value
    entries.move_to_end(key)
    while len(entries) > capacity:
        entries.popitem(last=False)


@dataclass(frozen=True)
class LoadedImage:
    data: bytes | None  # the encoded bytes, as fetched; None when only `base64` is at hand
    md5: str  # md5_hex(data): the image's identity for the embedding and prefix caches
    size: tuple[int, int]  # (width, height) of the decoded image: what sets the tile count
    # A base64 payload seen decode before (`KnownImageSizes`), whitespace removed, in place of
    # its bytes: the engine decodes it on a cache miss.
    base64: str | None = None
    # SHA-256 of the bytes, when the front loaded them: the payload's identity on its way to the
    # engine process (`server/image_payloads.py`).
    sha256: str | None = None
    # uint8 [tiles, 3, S, S] (`tile_pixels`) made with `tiled_with`, when the image was decoded
    # here with a tiling given (and makes at most MAX_FRONT_TILES).
    tiles: Any = field(default=None, compare=False)  # a tensor: no == between images
    tiled_with: InternVLImageConfig | None = None

    @classmethod
    def decoded(cls, data: bytes, limits: ImageLimits) -> LoadedImage:
        """Decodes `data` (raises ImageError) to check it and learn its size."""
        return cls(data, md5_hex(data), decode_image(data, limits).size)


# Inline payloads and fetched bytes up to this size are base64-decoded and hashed on the event
# loop; larger ones in a worker thread (a 5 MB photo took ~18 ms of base64 and hashing on 2 CPU
# cores, time every other stream of the server would wait).
INLINE_WORK_BYTES = 1 << 20


async def load_image(
    source: ImageSource,
    limits: ImageLimits,
    client: ImageHttpClient,
    known: KnownImageSizes | None = None,
    tiling: InternVLImageConfig | None = None,
) -> LoadedImage:
    """Fetch and decode one image; decoding runs in a worker thread, and is skipped for an
    image `known` has seen decode before (a base64 payload seen before is not decoded at all).
    A decoded image is also tiled with `tiling`, if given, in the same thread (up to
    MAX_FRONT_TILES tiles)."""
    payload_digest = None
    if source.kind == "base64" and known is not None:
        payload = compact_base64(source.data)
        if payload.isascii():  # else not base64: decode_base64 says why
            if len(payload) > INLINE_WORK_BYTES:
                payload_digest = await asyncio.to_thread(_payload_digest, payload)
            else:
                payload_digest = _payload_digest(payload)
            seen = known.payload(payload_digest)
            if seen is not None:
                return LoadedImage(None, seen[0], seen[1], base64=payload, sha256=seen[2])
    if source.kind == "base64" and len(source.data) > INLINE_WORK_BYTES:
        data = await asyncio.to_thread(decode_base64, source.data, limits)
    else:
        data = await fetch_image_bytes(source, limits, client)
    if len(data) > INLINE_WORK_BYTES:
        md5, digest = await asyncio.to_thread(_digests, data)
    else:
        md5, digest = _digests(data)
    size = known.get(digest) if known is not None else None
    tiles = None
    if size is None:
        size, tiles = await asyncio.to_thread(_decode_and_tile, data, limits, tiling)
        if known is not None:
            known.put(digest, size)
    if known is not None and payload_digest is not None:
        known.put_payload(payload_digest, md5, size, digest)
    tiled_with = tiling if tiles is not None else None
    return LoadedImage(data, md5, size, sha256=digest, tiles=tiles, tiled_with=tiled_with)


def _decode_and_tile(
    data: bytes, limits: ImageLimits, tiling: InternVLImageConfig | None
) -> tuple[tuple[int, int], Any]:
    """(size, tiles or None) of the bytes; raises ImageError."""
    image = decode_image(data, limits)
    if tiling is None or count_tiles(*image.size, tiling) > MAX_FRONT_TILES:
        return image.size, None
    return image.size, tile_pixels(image, tiling)


def _payload_digest(payload: str) -> str:
    return hashlib.sha256(payload.encode("ascii")).hexdigest()


def _digests(data: bytes) -> tuple[str, str]:
    """(MD5, SHA-256) of the bytes: the caches' key, and the front's memory's key."""
    return md5_hex(data), hashlib.sha256(data).hexdigest()
