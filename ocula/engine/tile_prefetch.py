"""The window of images tiled ahead of admission, in worker threads (`ImageScheduler` uses it).

A tiling is keyed by the image's cache key and shared by every waiting request that shows the
image (its waiters); the last waiter to leave cancels it. At most MAX_PREFETCHED_TOKENS
placeholder tokens' worth of tiles wait at once, whoever made them: tiles the server's front
made and sent with a request (`ImageSpan.pixel_values` beside the image's payload) enter the
window as a finished tiling, and are dropped where the window is full or the image is cached or
tiled already (its bytes are tiled again when needed).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures

import torch

from ocula.engine.request import ImageSpan, Request
from ocula.engine.tiling_signal import TilingSignal

# Placeholder tokens of the images tiled ahead of admission at once, at most: their uint8 tiles
# wait in memory. InternVL's tiles take 2,352 bytes per placeholder token (a 448 px tile is 602 KB
# for 256 tokens), so this bounds them at about 77 MB: 128 one-tile images, or 9 of 13 tiles.
# One image is always allowed, whatever its size.
MAX_PREFETCHED_TOKENS = 32768
# PIL decodes and resizes without the GIL: tiling scales with threads, up to the cores spared.
PREFETCH_THREADS = max(1, min(4, (os.cpu_count() or 2) // 2))


def finished(tiles: torch.Tensor) -> Future[torch.Tensor]:
    """A tiling already done."""
    done: Future[torch.Tensor] = Future()
    done.set_result(tiles)
    return done


def take_front_tiles(span: ImageSpan) -> torch.Tensor | None:
    """Takes the tiles the front made off the span: tiles that come with the image's payload,
    which can make them again. Tiles given without a payload stay (nothing could remake them)."""
    if span.pixel_values is None or (span.image_bytes is None and span.image_base64 is None):
        return None
    tiles, span.pixel_values = span.pixel_values, None
    return tiles


class TilePrefetch:
    def __init__(self, preprocess: Callable[[ImageSpan], torch.Tensor] | None) -> None:
        """`preprocess`: a span's uint8 tiles from its payload; None for an engine without a
        vision encoder (nothing is ever tiled)."""
        self._preprocess = preprocess
        self.tiles: dict[str, Future[torch.Tensor]] = {}  # by cache key
        self.tokens: dict[str, int] = {}  # placeholder tokens of each key in `tiles`
        self.waiters: dict[str, set[str]] = {}  # waiting request ids per key in `tiles`
        self._pool: ThreadPoolExecutor | None = None
        self.signal = TilingSignal()  # readable when a tiling finishes

    def start(self, request: Request, is_cached: Callable[[str], bool], past_window: bool) -> bool:
        """Starts tiling the request's images that are not cached (nor being tiled already), or
        takes the front's tiles for them; idempotent. False when the window is full before all
        of them are started (never with `past_window`)."""
        if self._preprocess is None:
            return True
        for index, span in enumerate(request.images):
            tiles = take_front_tiles(span)
            if span.key in self.tiles:  # another waiting request's image too
                self.waiters[span.key].add(request.request_id)
                continue
            if span.pixel_values is not None or is_cached(span.key):
                continue
            window = sum(self.tokens.values())
            if not past_window and self.tiles and window + span.length > MAX_PREFETCHED_TOKENS:
                for later in request.images[index + 1 :]:
                    take_front_tiles(later)
                return False
            self.tiles[span.key] = finished(tiles) if tiles is not None else self.submit(span)
            self.tokens[span.key] = span.length
            self.waiters[span.key] = {request.request_id}
        return True

    def drop_request(self, request: Request) -> None:
        """Forgets the tiles of a request that leaves before its admission, unless another
        waiting request needs the same image."""
        for span in request.images:
            self.drop_waiter(span.key, request.request_id)

    def drop_waiter(self, key: str, request_id: str) -> None:
        waiters = self.waiters.get(key)
        if waiters is None:
            return
        waiters.discard(request_id)
        if not waiters:
            self.take(key).cancel()

    def take(self, key: str) -> Future[torch.Tensor] | None:
        """The image's tiling, out of the window (its waiters forgotten); None if not there."""
        self.waiters.pop(key, None)
        self.tokens.pop(key, None)
        return self.tiles.pop(key, None)

    def submit(self, span: ImageSpan) -> Future[torch.Tensor]:
        """Tiles the span's payload in a worker thread (outside the window's accounting)."""
        if self._preprocess is None:
            raise RuntimeError("an image reached an engine without a vision encoder")
        if self._pool is None:
            self._pool = ThreadPoolExecutor(PREFETCH_THREADS, "ocula-tiling")
        future = self._pool.submit(self._preprocess, span)
        future.add_done_callback(self.signal.notify)
        return future

    def is_done(self, key: str) -> bool:
        return key in self.tiles and self.tiles[key].done()

    def wait_for_any(self) -> None:
        """Blocks until one of the tilings under way finishes (at once if none is)."""
        running = [future for future in self.tiles.values() if not future.done()]
        if running:
            wait_for_futures(running, return_when=FIRST_COMPLETED)
