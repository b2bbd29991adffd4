"""Scheduling of image inputs: which images need the vision encoder this step, which cached
embeddings to drop, and which embedding rows go where in the batch.

An image sits in a request's tokens as a span of placeholder tokens (`ImageSpan`); its embedding
has one row per placeholder. The scheduler admits a request, then this class:
- skips images entirely inside the prefix-cache hit (their KV is cached: no embedding needed);
- acquires cached embeddings (a hit skips preprocessing and the ViT), or registers a miss, with
  pages of the runner's embedding pool to hold it, and queues its pixels for encoding in this very
  step, before the forward; `can_admit` says beforehand whether the pool has room for a request's
  misses (evicting free entries), else the request waits;
- for every prefill chunk, names the slices of embeddings that replace the placeholder rows of
  that chunk (a chunk may start or end inside an image: the embedding is sliced, never
  recomputed);
- releases the request's embeddings once its last image token is planned (at the next plan's
  start) or when it stops running, whichever comes first; evicted keys reach the runner as a
  plan's frees, which it drops before that plan's encodes.

Tiling an image (decode, resize, crop) is CPU work of a millisecond to tens of milliseconds.
The server's front tiles the images it decodes and sends the tiles with the request; the others
(an image the front had seen, the offline engine's) are tiled here, in worker threads, ahead of
admission: `prefetch` starts it when a request arrives (or takes the front's tiles), and
`finish_plan` tops the window up from the waiting queue every step, in queue order, for images
the embedding cache does not hold (the window: `tile_prefetch.py`). The scheduler admits a
request only once `tiles_ready` (`tiling_admission.py`), so a step never waits for tiling; an
engine with nothing else to do waits for the next tiling to finish (`wait_for_tiles`, or
`tiling.fileno()` beside other inputs). `finish_plan` hands the admitted images' tiles to the
encoder; an image admitted without a prefetch (called directly, as tests do) is tiled then, in
the same threads.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from ocula.engine.embedding_cache import EmbeddingCacheIndex
from ocula.engine.embedding_pool import pages_for_rows
from ocula.engine.request import ImageSpan, Request
from ocula.engine.tile_prefetch import TilePrefetch, finished


@dataclass
class EncoderInput:
    key: str
    pixel_values: torch.Tensor  # [tiles, 3, H, W] CPU: uint8 tiles, or float32 normalized
    pages: list[int]  # of the embedding pool, in row order, where the embedding goes


@dataclass
class PendingImage:
    """An image `admit` sends to the encoder, its tiles possibly still being made."""

    key: str
    pixel_values: Future[torch.Tensor]
    pages: list[int]


@dataclass
class ImageSlice:
    """Rows [src_start, src_end) of image `key`'s embedding replace the rows starting at
    `dst_start` of the sequence's chunk (counted from the chunk's first token)."""

    key: str
    src_start: int
    src_end: int
    dst_start: int


# Waiting requests `finish_plan` looks at, at most, each step (the queue's head is admitted first).
PREFETCH_LOOKAHEAD = 256


class ImageScheduler:
    def __init__(
        self,
        cache_capacity: int,
        preprocess: Callable[[ImageSpan], torch.Tensor] | None,
        num_pages: int,
        page_rows: int,
    ) -> None:
        """`num_pages` pages of `page_rows` embedding rows: the runner's `EmbeddingPool`."""
        self.index = EmbeddingCacheIndex(cache_capacity, num_pages)
        self.page_rows = page_rows
        self._preprocess = preprocess
        self._pending_frees: list[str] = []
        self._to_release: list[Request] = []  # at the next plan's start
        self.num_served_by_prefix_cache = 0  # images whose KV was cached: no embedding needed
        self.prefetcher = TilePrefetch(preprocess)
        self.tiling = self.prefetcher.signal  # readable when a tiling finishes

    def prefetch(self, request: Request, past_window: bool = False) -> bool:
        """Starts tiling the request's images that are not cached (nor being tiled already);
        idempotent. False when the window is full before all of them are started (never with
        `past_window`). See `TilePrefetch.start` for the front's tiles."""
        return self.prefetcher.start(request, self.index.__contains__, past_window)

    def drop_prefetched(self, request: Request) -> None:
        """Forgets the tiles prefetched for a request that leaves before its admission, unless
        another waiting request needs the same image."""
        self.prefetcher.drop_request(request)

    def wait_for_tiles(self) -> None:
        """Blocks until one of the tilings under way finishes (at once if none is)."""
        self.prefetcher.wait_for_any()

    def _new_images(self, request: Request, cached_prefix_len: int) -> dict[str, int]:
        """Pages of each image the request would encode now (not cached, not in its prefix hit)."""
        return {
            span.key: pages_for_rows(span.length, self.page_rows)
            for span in request.images
            if span.offset + span.length > cached_prefix_len and span.key not in self.index
        }

    def encodes_images(self, request: Request, cached_prefix_len: int) -> bool:
        """Whether admitting the request now would run the vision encoder."""
        return bool(self._new_images(request, cached_prefix_len))

    def pages_needed(self, request: Request) -> int:
        """Pool pages the request's images take at most (none cached, no prefix hit)."""
        lengths = {span.key: span.length for span in request.images}
        return sum(pages_for_rows(length, self.page_rows) for length in lengths.values())

    def tiles_ready(self, request: Request, cached_prefix_len: int, past_window: bool) -> bool:
        """Whether every image the request would encode now has its tiles made, so that a step
        admitting it does not wait for them; starts tiling those not started (`past_window`:
        whatever the prefetch window holds)."""
        new = self._new_images(request, cached_prefix_len)
        if not new or self._preprocess is None:
            return True
        self.prefetch(request, past_window)
        return self._tiles_made(request, new)

    def tiles_pending(self, request: Request) -> bool:
        """Whether an image the request could encode (whatever its prefix-cache hit) has no tiles
        made yet. Starts no tiling."""
        new = self._new_images(request, 0)
        return bool(new) and self._preprocess is not None and not self._tiles_made(request, new)

    def _tiles_made(self, request: Request, keys: Iterable[str]) -> bool:
        given = {span.key for span in request.images if span.pixel_values is not None}
        return all(key in given or self.prefetcher.is_done(key) for key in keys)

    def can_admit(self, request: Request, cached_prefix_len: int) -> bool:
        """Whether the pool has room for the request's images now (see `admit`)."""
        # Every image the request still needs: the cached ones among them must not be evicted.
        wanted = [s.key for s in request.images if s.offset + s.length > cached_prefix_len]
        return self.index.can_fit(
            sum(self._new_images(request, cached_prefix_len).values()), keep=wanted
        )

    def admit(
        self, request: Request, cached_prefix_len: int
    ) -> tuple[list[PendingImage], list[str]]:
        """Acquires the embeddings a newly admitted request needs; returns what to encode now and
        which keys were evicted for room. The pixel values come with `finish_plan`. Only for a
        request `can_admit` allowed, with nothing admitted in between."""
        to_encode: list[PendingImage] = []
        evicted: list[str] = []
        wanted = []
        for span in request.images:
            if span.offset + span.length <= cached_prefix_len:
                # Its KV is cached: no embedding needed here, but other waiting requests may
                # still need the tiles.
                self.prefetcher.drop_waiter(span.key, request.request_id)
                self.num_served_by_prefix_cache += 1
            else:
                wanted.append(span)
        # Cached images first: acquired, they cannot be evicted to make room for this request's
        # new ones (as `can_admit` assumed).
        cached = [span for span in wanted if span.key in self.index]
        for span in cached + [span for span in wanted if span.key not in self.index]:
            # Taken whether the embedding is cached or encoded now: requests waiting with the
            # same image will find it in the cache.
            prefetched = self.prefetcher.take(span.key)
            if self.index.lookup(span.key):
                self.index.acquire(span.key)
            else:
                pages = pages_for_rows(span.length, self.page_rows)
                evicted += self.index.add(span.key, pages)
                pixels = self._pixels(span, prefetched)
                to_encode.append(PendingImage(span.key, pixels, self.index.pages_of(span.key)))
            request.held_image_keys.append(span.key)
        return to_encode, evicted

    def finish_plan(
        self, to_encode: list[PendingImage], waiting: Iterable[Request]
    ) -> list[EncoderInput]:
        """Tops up the prefetch window from the head of `waiting`, then waits for the tiles of
        the step's images (`admit`'s results, in order) and returns them for the encoder."""
        if self._preprocess is not None:
            for request in itertools.islice(waiting, PREFETCH_LOOKAHEAD):
                if not self.prefetch(request):
                    break
        return [
            EncoderInput(item.key, item.pixel_values.result(), item.pages) for item in to_encode
        ]

    def _pixels(
        self, span: ImageSpan, prefetched: Future[torch.Tensor] | None
    ) -> Future[torch.Tensor]:
        if span.pixel_values is not None:
            return finished(span.pixel_values)
        if prefetched is not None:
            return prefetched
        return self.prefetcher.submit(span)  # raises without a vision encoder

    def release(self, request: Request) -> None:
        for key in request.held_image_keys:
            self._pending_frees += self.index.release(key)
        request.held_image_keys.clear()

    def forget_all(self) -> None:
        """Empties the embedding cache (its pages are freed with the next plan) and starts its
        counters over. Only while no request holds or waits for an image."""
        if self.prefetcher.tiles:
            raise RuntimeError("forget_all with images still being tiled")
        self._pending_frees += self.index.clear()
        self._to_release = []  # finished requests: they hold nothing any more
        self.num_served_by_prefix_cache = 0

    def release_once_planned(self, request: Request) -> None:
        """Once the chunk holding a request's last image token is planned, the request no longer
        needs its embeddings: their pages of the embedding pool become evictable for waiting
        requests' new images, however many requests run (a recompute after preemption acquires
        or encodes them again).
        They are released at the start of the next plan (`start_plan`): that plan's frees come
        before its encodes, and this plan, which reads them, is launched before it."""
        if not request.held_image_keys:
            return
        images_end = max(span.offset + span.length for span in request.images)
        if request.num_scheduled_tokens >= images_end:
            self._to_release.append(request)

    def start_plan(self) -> list[str]:
        """Releases what `release_once_planned` deferred; returns the keys the runner must free
        before the new plan's encodes (evicted since the last plan)."""
        for request in self._to_release:  # a finished one has released them already
            self.release(request)
        self._to_release = []
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
