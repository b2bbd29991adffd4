"""The image-embedding cache index: LRU order, pinning by users, hit/miss counts, pool pages."""

from __future__ import annotations

import pytest
import torch

from ocula.engine.embedding_cache import EmbeddingCacheIndex
from ocula.engine.image_inputs import ImageScheduler
from ocula.engine.prefix_cache import RadixCache
from ocula.engine.request import ImageSpan, Request
from ocula.engine.scheduler import Scheduler
from ocula.engine.slot_allocator import SlotAllocator
from ocula.engine.step_plan import SampledToken
from ocula.sampling.params import SamplingParams


def tile(span: ImageSpan) -> torch.Tensor:
    return torch.zeros((1, 3, 2, 2), dtype=torch.uint8)


def test_lru_eviction_skips_entries_in_use() -> None:
    cache = EmbeddingCacheIndex(capacity=2, num_pages=100)
    assert cache.add("a", 1) == [] and cache.add("b", 1) == []  # each held by its request
    assert cache.release("b") == []
    assert cache.add("c", 1) == ["b"]  # a is in use, b is the least recently used free entry
    assert "a" in cache and "c" in cache and "b" not in cache
    # Every entry in use: the cache grows past capacity instead of dropping one.
    assert cache.add("d", 1) == []
    assert len(cache) == 3 and cache.num_in_use == 3
    assert cache.release("a") == ["a"]  # freed and over capacity: dropped at once
    assert len(cache) == 2


def test_lookup_counts_and_refreshes_recency() -> None:
    cache = EmbeddingCacheIndex(capacity=2, num_pages=100)
    cache.add("a", 1)
    cache.add("b", 1)
    cache.release("a")
    cache.release("b")
    assert cache.lookup("a") is True  # a becomes the most recent
    assert cache.lookup("z") is False
    assert (cache.hits, cache.misses) == (1, 1)
    assert cache.add("c", 1) == ["b"]


def test_pages_are_a_hard_limit_met_by_evicting_free_entries_oldest_first() -> None:
    cache = EmbeddingCacheIndex(capacity=10, num_pages=8)
    cache.add("a", 3)
    cache.add("b", 3)
    cache.add("c", 2)
    assert cache.num_free_pages == 0
    pages = {key: cache.pages_of(key) for key in "abc"}
    assert sorted(p for ps in pages.values() for p in ps) == list(range(8))
    assert not cache.can_fit(1)  # everything in use
    with pytest.raises(RuntimeError, match="in use"):
        cache.add("d", 1)
    cache.release("b")
    cache.release("a")
    cache.lookup("b")  # b is now more recent than a
    assert cache.can_fit(6) and not cache.can_fit(7)
    # Room for 4 pages: a (oldest, 3 pages) is not enough alone, so b goes too.
    assert cache.add("d", 4) == ["a", "b"]
    assert set(cache.pages_of("d")) <= set(pages["a"]) | set(pages["b"])
    assert cache.num_free_pages == 2
    # A cached free entry the request is about to use does not count as room.
    cache.add("e", 2)
    cache.release("e")
    assert cache.can_fit(2) and not cache.can_fit(2, keep=["e"])
    cache.acquire("e")
    assert not cache.can_fit(1)


def test_misuse_is_refused() -> None:
    cache = EmbeddingCacheIndex(capacity=1, num_pages=4)
    cache.add("a", 1)
    with pytest.raises(ValueError, match="already cached"):
        cache.add("a", 1)
    cache.release("a")
    with pytest.raises(RuntimeError, match="no request holds"):
        cache.release("a")
    with pytest.raises(ValueError, match="capacity"):
        EmbeddingCacheIndex(0, 4)
    with pytest.raises(ValueError, match="page"):
        EmbeddingCacheIndex(1, 0)


def test_a_request_keeps_its_cached_image_while_making_room_for_its_new_one() -> None:
    def with_images(name: str, *spans: tuple[str, int]) -> Request:
        images, offset = [], 0
        for key, length in spans:
            images.append(ImageSpan(key, offset, length, image_bytes=b"x"))
            offset += length
        return Request(name, [5] * offset, SamplingParams(), frozenset(), images)

    images = ImageScheduler(8, tile, num_pages=3, page_rows=4)
    for name, key in (("first", "k"), ("second", "x")):  # k then x cached, both free
        request = with_images(name, (key, 4))
        images.admit(request, 0)
        images.release(request)
    # A new 2-page image before the cached k: room must come from x alone, not from k.
    request = with_images("third", ("a", 8), ("k", 4))
    assert images.can_admit(request, 0)
    to_encode, evicted = images.admit(request, 0)
    assert [item.key for item in to_encode] == ["a"] and evicted == ["x"]
    assert (images.index.hits, images.index.misses) == (1, 3)


def test_running_requests_stop_holding_embeddings_once_their_images_are_planned() -> None:
    def run(plan) -> None:
        scheduler.update(plan, [SampledToken(s.request_id, 7) for s in plan.sequences if s.samples])

    images = ImageScheduler(1, tile, num_pages=4, page_rows=4)
    allocator = SlotAllocator(256)
    # Chunks of 8 tokens: a prompt of 4 text tokens, an 8-token image, 4 text tokens takes two.
    scheduler = Scheduler(allocator, RadixCache(allocator), 8, 8, 8, 100, images=images)
    params = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)

    def with_image(name: str, key: str, first_token: int) -> Request:
        span = ImageSpan(key, 4, 8, image_bytes=b"x")
        return Request(name, [first_token + i for i in range(16)], params, frozenset(), [span])

    first = with_image("a", "ka", 100)
    scheduler.add_request(first)
    images.prefetch(first)  # as the engine does on arrival; an idle engine waits for the tiles
    images.prefetcher.tiles["ka"].result()
    plan = scheduler.schedule()  # tokens 0-7: half the image
    assert [item.key for item in plan.encoder_inputs] == ["ka"] and first.held_image_keys
    run(plan)
    plan = scheduler.schedule()  # tokens 8-15: the image's end, released at the next plan
    assert first.held_image_keys == ["ka"] and plan.encoder_frees == []
    run(plan)
    # `first` now decodes and holds nothing: a new image may take the cache's only entry, and
    # the plan that encodes it frees the old one first (the runner drops, then encodes).
    second = with_image("b", "kb", 300)
    scheduler.add_request(second)
    images.prefetch(second)  # as the engine does on arrival; with `first` running, `second`
    images.prefetcher.tiles["kb"].result()  # is admitted once its tiles are made
    plan = scheduler.schedule()
    assert first.held_image_keys == [] and images.index.num_in_use == 1
    assert plan.encoder_frees == ["ka"] and [i.key for i in plan.encoder_inputs] == ["kb"]
