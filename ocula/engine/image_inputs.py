"""Scheduling of image inputs: which images need the vision encoder this step, which cached
embeddings to drop, and which embedding rows go where in the batch.

An image sits in a request's tokens as a span of placeholder tokens (`ImageSpan`); its embedding
has one row per placeholder. The scheduler admits a request, then this class:
- skips images entirely inside the prefix-cache hit (their KV is cached: no embedding needed);
- acquires cached embeddings (a hit skips preprocessing and the ViT), or registers a miss and
  queues its pixels for encoding in this very step, before the forward;
- for every prefill chunk, names the slices of embeddings that replace the placeholder rows of
  that chunk (a chunk may start or end inside an image: the embedding is sliced, never
  recomputed);
- releases the request's embeddings when it stops running; evicted keys reach the runner with
  the next plan.

Tiling an image (decode, resize, crop) is CPU work of a millisecond to tens of milliseconds;
done at admission it would stall the engine loop, and every running request with it. So
`prefetch` starts it in a worker thread when the request arrives, for images the embedding
cache does not hold (at most MAX_PREFETCHED_IMAGES at a time, shared by key); admission then
takes the result, or tiles the image itself if it was not prefetched.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ocula.engine.embedding_cache import EmbeddingCacheIndex
from ocula.engine.request import ImageSpan, Request


@dataclass
class EncoderInput:
    key: str
    pixel_values: torch.Tensor  # [tiles, 3, H, W] CPU: uint8 tiles, or float32 normalized


@dataclass
class ImageSlice:
    """Rows [src_start, src_end) of image `key`'s embedding replace the rows starting at
    `dst_start` of the sequence's chunk (counted from the chunk's first token)."""

    key: str
    src_start: int
    src_end: int
    dst_start: int


# Images tiled ahead of admission at once, at most (their uint8 tiles wait in memory).
MAX_PREFETCHED_IMAGES = 16
PREFETCH_THREADS = 2


class ImageScheduler:
    def __init__(
        self, cache_capacity: int, preprocess: Callable[[ImageSpan], torch.Tensor] | None
    ) -> None:
        self.index = EmbeddingCacheIndex(cache_capacity)
        self._preprocess = preprocess
        self._pending_frees: list[str] = []
        self.num_served_by_prefix_cache = 0  # images whose KV was cached: no embedding needed
        self._prefetched: dict[str, Future[torch.Tensor]] = {}  # by cache key
        self._prefetch_waiters: Counter[str] = Counter()  # waiting requests per prefetched key
        self._pool: ThreadPoolExecutor | None = None

    def prefetch(self, request: Request) -> None:
        """Starts tiling the request's images that are not cached (nor being tiled already)."""
        if self._preprocess is None:
            return
        for span in request.images:
            if span.key in self._prefetched:  # another waiting request's image too
                self._prefetch_waiters[span.key] += 1
                continue
            if len(self._prefetched) >= MAX_PREFETCHED_IMAGES:
                return
            if span.pixel_values is None and span.key not in self.index:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(PREFETCH_THREADS, "ocula-tiling")
                self._prefetched[span.key] = self._pool.submit(self._preprocess, span)
                self._prefetch_waiters[span.key] = 1

    def drop_prefetched(self, request: Request) -> None:
        """Forgets the tiles prefetched for a request that leaves before its admission, unless
        another waiting request needs the same image."""
        for span in request.images:
            if span.key not in self._prefetched:
                continue
            self._prefetch_waiters[span.key] -= 1
            if self._prefetch_waiters[span.key] <= 0:
                self._take_prefetched(span.key).cancel()

    def _take_prefetched(self, key: str) -> Future[torch.Tensor] | None:
        self._prefetch_waiters.pop(key, None)
        return self._prefetched.pop(key, None)

    def admit(
        self, request: Request, cached_prefix_len: int
    ) -> tuple[list[EncoderInput], list[str]]:
        """Acquires the embeddings a newly admitted request needs; returns what to encode now and
        which keys were evicted for room."""
        to_encode: list[EncoderInput] = []
        evicted: list[str] = []
        for span in request.images:
            # Taken whatever happens next, so that nothing admitted stays prefetched; requests
            # waiting with the same image will find its embedding cached.
            prefetched = self._take_prefetched(span.key)
            if span.offset + span.length <= cached_prefix_len:
                self.num_served_by_prefix_cache += 1
                continue
            if self.index.lookup(span.key):
                self.index.acquire(span.key)
            else:
                evicted += self.index.add(span.key)
                to_encode.append(EncoderInput(span.key, self._pixels(span, prefetched)))
            request.held_image_keys.append(span.key)
        return to_encode, evicted

    def _pixels(self, span: ImageSpan, prefetched: Future[torch.Tensor] | None) -> torch.Tensor:
        if span.pixel_values is not None:
            return span.pixel_values
        if prefetched is not None:
            return prefetched.result()
        if self._preprocess is None:
            raise RuntimeError("an image reached an engine without a vision encoder")
        return self._preprocess(span)

    def release(self, request: Request) -> None:
        for key in request.held_image_keys:
            self._pending_frees += self.index.release(key)
        request.held_image_keys.clear()

    def take_pending_frees(self) -> list[str]:
        frees, self._pending_frees = self._pending_frees, []
        return frees

    @staticmethod
    def slices(request: Request, start: int, end: int) -> list[ImageSlice]:
        """Embedding slices covering the placeholder tokens in positions [start, end)."""
        result = []
        for span in request.images:
            lo = max(start, span.offset)
            hi = min(end, span.offset + span.length)
            if lo < hi:
                result.append(ImageSlice(span.key, lo - span.offset, hi - span.offset, lo - start))
        return result
