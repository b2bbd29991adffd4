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
