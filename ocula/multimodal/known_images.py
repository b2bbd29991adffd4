"""The front's memory of images it has already checked, so that it need not decode them again."""

from __future__ import annotations

from collections import OrderedDict


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
