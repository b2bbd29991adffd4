"""An image as the prompt builder sees it (bytes, MD5, size) and how the front loads one:
fetched or base64-decoded, hashed, and decoded once to be checked and measured, unless the
front's memory of sizes knows its bytes already."""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import httpx

from ocula.multimodal.image_loading import (
    ImageLimits,
    ImageSource,
    decode_base64,
    decode_image,
    fetch_image_bytes,
    md5_hex,
)


class KnownImageSizes:
    """Sizes of images that decoded within the limits before, by SHA-256 of their bytes, most
    recent last (LRU).

    An image sent again (a follow-up question about it, the same picture in many requests) is
    not decoded again in the front: the engine's caches hold its embedding, so its size is all
    the prompt needs. Identical bytes decode identically; the limits are the server's, fixed.
    Keyed by SHA-256, not by the caches' MD5: MD5 collisions can be forged, and a forged twin of
    a known image must still be decoded and checked before the engine sees it.
    """

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._sizes: OrderedDict[str, tuple[int, int]] = OrderedDict()

    def get(self, digest: str) -> tuple[int, int] | None:
        size = self._sizes.get(digest)
        if size is not None:
            self._sizes.move_to_end(digest)
        return size

    def put(self, digest: str, size: tuple[int, int]) -> None:
        self._sizes[digest] = size
        self._sizes.move_to_end(digest)
        while len(self._sizes) > self.capacity:
            self._sizes.popitem(last=False)

    def __len__(self) -> int:
        return len(self._sizes)


@dataclass(frozen=True)
class LoadedImage:
    data: bytes  # the encoded bytes, as fetched
    md5: str  # md5_hex(data): the image's identity for the embedding and prefix caches
    size: tuple[int, int]  # (width, height) of the decoded image: what sets the tile count

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
    client: httpx.AsyncClient,
    known: KnownImageSizes | None = None,
) -> LoadedImage:
    """Fetch and decode one image; decoding runs in a worker thread, and is skipped for an
    image `known` has seen decode before."""
    if source.kind == "base64" and len(source.data) > INLINE_WORK_BYTES:
        data = await asyncio.to_thread(decode_base64, source.data, limits)
    else:
        data = await fetch_image_bytes(source, limits, client)
    if len(data) > INLINE_WORK_BYTES:
        md5, digest = await asyncio.to_thread(_digests, data)
    else:
        md5, digest = _digests(data)
    size = known.get(digest) if known is not None else None
    if size is None:
        size = (await asyncio.to_thread(decode_image, data, limits)).size
        if known is not None:
            known.put(digest, size)
    return LoadedImage(data, md5, size)


def _digests(data: bytes) -> tuple[str, str]:
    """(MD5, SHA-256) of the bytes: the caches' key, and the front's memory's key."""
    return md5_hex(data), hashlib.sha256(data).hexdigest()
