"""Which waiting requests one plan passes over because their images are still being tiled.

A step never waits for tiling (see `image_inputs`): a request whose tiles are not made yet keeps
its place in the queue while later requests are admitted past it; the first such request has
its tiling started past the prefetch window. On an idle engine, when a request the plan could
admit still has tiles being made, every request with images to encode waits, so that they are
encoded and prefilled together once all are tiled (an offline batch's first step), while
requests without new images go first: a text request never waits for someone's tiling.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from ocula.engine.image_inputs import ImageScheduler
from ocula.engine.plan_chunks import chunk_size
from ocula.engine.request import PLACEHOLDER_TOKEN, Request
from ocula.engine.request_kv import RequestKV


class TilingGate:
    """One plan's decisions (`for_plan`), then `must_wait` for each waiting request in order."""

    def __init__(self, images: ImageScheduler | None, batch_images: bool) -> None:
        self._images = images
        self._batch_images = batch_images
        self._passed_one = False

    @classmethod
    def for_plan(
        cls,
        images: ImageScheduler | None,
        kv: RequestKV,
        waiting: Iterable[Request],
        rows: int,
        budget: int,
        chunked_prefill_size: int | None,
        idle: bool,
    ) -> TilingGate:
        """`rows` free table rows and `budget` tokens: what this plan may admit at most;
        `images` None for an engine without a vision encoder."""
        batch = (
            idle
            and images is not None
            and _untiled_within(images, kv, waiting, rows, budget, chunked_prefill_size)
        )
        return cls(images, batch)

    def must_wait(self, request: Request, prefix_len: int) -> bool:
        """Whether the plan passes over this request (its prefix-cache hit `prefix_len`)."""
        if not request.images or self._images is None:
            return False
        if self._batch_images:
            return self._images.encodes_images(request, prefix_len)
        first = not self._passed_one
        wait = not self._images.tiles_ready(request, prefix_len, past_window=first)
        self._passed_one |= wait
        return wait


def _untiled_within(
    images: ImageScheduler,
    kv: RequestKV,
    waiting: Iterable[Request],
    rows: int,
    budget: int,
    chunked_prefill_size: int | None,
) -> bool:
    """Whether a request the plan could admit still has tiles being made (all of their tilings
    are started, window or not)."""
    for request in itertools.islice(waiting, rows):
        if budget <= 0 or request.token_ids[-1] == PLACEHOLDER_TOKEN:
            break
        if request.images and images.tiles_pending(request):
            prefix_len = kv.match_prefix(request)
            num_new = chunk_size(request, budget, chunked_prefill_size)
            ready = images.tiles_ready(request, prefix_len, past_window=True)
            kv.unlock_prefix(request)
            if not ready:
                return True
        else:
            # Text, or images whose embeddings are cached or whose tiles are made (the front's,
            # or a finished prefetch): nothing to wait for whatever the request's prefix-cache
            # hit, which is not looked up here (~0.1 ms for an image prompt's); its chunk is
            # counted whole.
            num_new = chunk_size(request, budget, chunked_prefill_size)
        if num_new == 0:  # the plan stops here
            break
        budget -= num_new
    return False
