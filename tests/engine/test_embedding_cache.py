"""The image-embedding cache index: LRU order, pinning by users, hit/miss counts."""

from __future__ import annotations

import pytest

from ocula.engine.embedding_cache import EmbeddingCacheIndex


def test_lru_eviction_skips_entries_in_use() -> None:
    cache = EmbeddingCacheIndex(capacity=2)
    assert cache.add("a") == [] and cache.add("b") == []  # each held by the request adding it
    assert cache.release("b") == []
    assert cache.add("c") == ["b"]  # a is in use, b is the least recently used free entry
    assert "a" in cache and "c" in cache and "b" not in cache
    # Every entry in use: the cache grows past capacity instead of dropping one.
    assert cache.add("d") == []
    assert len(cache) == 3 and cache.num_in_use == 3
    assert cache.release("a") == ["a"]  # freed and over capacity: dropped at once
    assert len(cache) == 2


def test_lookup_counts_and_refreshes_recency() -> None:
    cache = EmbeddingCacheIndex(capacity=2)
    cache.add("a")
    cache.add("b")
    cache.release("a")
    cache.release("b")
    assert cache.lookup("a") is True  # a becomes the most recent
    assert cache.lookup("z") is False
    assert (cache.hits, cache.misses) == (1, 1)
    assert cache.add("c") == ["b"]


def test_misuse_is_refused() -> None:
    cache = EmbeddingCacheIndex(capacity=1)
    cache.add("a")
    with pytest.raises(ValueError, match="already cached"):
        cache.add("a")
    cache.release("a")
    with pytest.raises(RuntimeError, match="no request holds"):
        cache.release("a")
    with pytest.raises(ValueError, match="capacity"):
        EmbeddingCacheIndex(0)


def test_images_are_tiled_ahead_in_a_worker_thread_and_taken_once() -> None:
    import threading

    import torch

    from ocula.engine import image_inputs
    from ocula.engine.image_inputs import ImageScheduler
    from ocula.engine.request import ImageSpan, Request
    from ocula.sampling.params import SamplingParams

    calls: list[tuple[str, str]] = []
    release = threading.Event()

    def tile(span: ImageSpan) -> torch.Tensor:
        calls.append((span.key, threading.current_thread().name))
        release.wait(5)
        return torch.full((1, 3, 2, 2), len(span.key), dtype=torch.uint8)  # tells images apart

    def request(name: str, *keys: str) -> Request:
        spans = [ImageSpan(key, 4 * i, 4) for i, key in enumerate(keys)]
        return Request(name, list(range(4 * len(keys) + 1)), SamplingParams(), frozenset(), spans)

    images = ImageScheduler(8, tile)
    first, same_image, other = request("a", "x"), request("b", "x"), request("c", "y", "z")
    for r in (first, same_image, other):
        images.prefetch(r)
    release.set()
    to_encode, _ = images.admit(first, 0)
    assert [(item.key, int(item.pixel_values.max())) for item in to_encode] == [("x", 1)]
    assert [key for key, _ in calls].count("x") == 1  # one tiling for both requests
    # A second request with the same image finds it cached: no tiling, nothing to encode.
    assert images.admit(same_image, 0) == ([], [])
    images.drop_prefetched(other)  # left while waiting: its prefetched tiles are forgotten
    assert images._prefetched == {}
    # Two waiting requests share a new image; the first leaves: the second keeps the tiles.
    leaving, staying = request("e", "w"), request("f", "w")
    images.prefetch(leaving)
    images.prefetch(staying)
    images.drop_prefetched(leaving)
    to_encode, _ = images.admit(staying, 0)
    assert [item.key for item in to_encode] == ["w"] and not images._prefetched
    assert sorted(key for key, _ in calls) == ["w", "x", "y", "z"]
    assert all(thread.startswith("ocula-tiling") for _, thread in calls)
    # The bound: no more than MAX_PREFETCHED_IMAGES wait at once; the rest tile at admission.
    many = request("d", *(f"k{i}" for i in range(image_inputs.MAX_PREFETCHED_IMAGES + 3)))
    images.prefetch(many)
    assert len(images._prefetched) == image_inputs.MAX_PREFETCHED_IMAGES
    to_encode, _ = images.admit(many, 0)
    assert len(to_encode) == image_inputs.MAX_PREFETCHED_IMAGES + 3 and not images._prefetched
