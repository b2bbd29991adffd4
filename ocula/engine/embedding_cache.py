"""Which image embeddings the engine holds: an LRU over image keys with reference counts, and
the pages of the device pool (`EmbeddingPool`) each one occupies.

This is the scheduler's (CPU) view; the rows live in the model runner's pool, at the pages this
index hands out. The scheduler tells the runner what to encode (with its pages) and what to drop
through the step plan, so both sides always agree on the set of keys.

Key: MD5 of the image bytes plus every preprocessing parameter that changes the embedding (tile
cap, thumbnail, image size), so the same bytes tiled differently are different entries.

Two limits:
- `capacity` entries (`--cache_capacity`), a soft one: an entry with users is never evicted, even
  when that leaves the cache above capacity for a while (requests in flight must keep their
  embeddings); the excess is dropped as soon as it is free.
- `num_pages` pages, a hard one (the pool is allocated once): `add` evicts free entries, least
  recently used first, until the new entry's pages are free. The caller asks `can_fit` first;
  when the entries in use leave too little room, the request waits for them.

Contract:
- `acquire(key)` marks an entry used by one more request; `release(key)` undoes it.
- `add(key, num_pages)` registers an entry the runner is about to encode, already acquired by the
  request that needs it; it returns the keys evicted (their pages are free again), which the
  runner must forget. `pages_of(key)` are the new entry's pages, in the embedding's row order.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass
class _Entry:
    users: int
    pages: list[int]


class EmbeddingCacheIndex:
    def __init__(self, capacity: int, num_pages: int) -> None:
        if capacity < 1:
            raise ValueError(
                f"the image embedding cache needs a capacity of at least 1, got {capacity}"
            )
        if num_pages < 1:
            raise ValueError(f"the image embedding pool needs at least 1 page, got {num_pages}")
        self.capacity = capacity
        self.num_pages = num_pages
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # LRU first
        self._free_pages = list(range(num_pages - 1, -1, -1))  # popped from the end: low first
        self._free_entry_pages = 0  # pages of the entries no request uses (evictable)
        self.hits = 0
        self.misses = 0

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def num_in_use(self) -> int:
        return sum(1 for entry in self._entries.values() if entry.users > 0)

    @property
    def num_free_pages(self) -> int:
        """Pages held by no entry (evictable entries' pages not counted)."""
        return len(self._free_pages)

    def pages_of(self, key: str) -> list[int]:
        return self._entries[key].pages

    def lookup(self, key: str) -> bool:
        """Counts a hit or a miss for an image of a new request; refreshes a hit's recency."""
        if key in self._entries:
            self.hits += 1
            self._entries.move_to_end(key)
            return True
        self.misses += 1
        return False

    def can_fit(self, num_pages: int, keep: Iterable[str] = ()) -> bool:
        """Whether `num_pages` new pages can be had by evicting free entries other than `keep`
        (cached entries the same request is about to acquire)."""
        kept = sum(
            len(entry.pages)
            for key in set(keep)
            if (entry := self._entries.get(key)) is not None and entry.users == 0
        )
        return len(self._free_pages) + self._free_entry_pages - kept >= num_pages

    def add(self, key: str, num_pages: int) -> list[str]:
        """Registers `key` (not yet present) with one user and `num_pages` pages; returns the
        keys evicted for room. Raises when the free entries cannot make room (see `can_fit`)."""
        if key in self._entries:
            raise ValueError(f"image {key} is already cached")
        evicted = self._evict(lambda: len(self._free_pages) < num_pages)
        if len(self._free_pages) < num_pages:
            raise RuntimeError(
                f"image {key} needs {num_pages} embedding pages but only "
                f"{len(self._free_pages)} of {self.num_pages} are free: the rest are in use"
            )
        pages = [self._free_pages.pop() for _ in range(num_pages)]
        self._entries[key] = _Entry(users=1, pages=pages)
        return evicted + self._evict(lambda: len(self._entries) > self.capacity)

    def acquire(self, key: str) -> None:
        entry = self._entries[key]
        if entry.users == 0:
            self._free_entry_pages -= len(entry.pages)
        entry.users += 1
        self._entries.move_to_end(key)

    def release(self, key: str) -> list[str]:
        """One request stopped using `key`; returns keys evicted because the cache was over."""
        entry = self._entries[key]
        if entry.users <= 0:
            raise RuntimeError(f"release of image {key}, which no request holds")
        entry.users -= 1
        if entry.users == 0:
            self._free_entry_pages += len(entry.pages)
        return self._evict(lambda: len(self._entries) > self.capacity)

    def clear(self) -> list[str]:
        """Evicts every entry and starts the hit counters over; returns the evicted keys. Only
        while no request holds an entry."""
        if self.num_in_use:
            raise RuntimeError(f"clear with {self.num_in_use} images in use")
        self.hits = 0
        self.misses = 0
        return self._evict(lambda: True)

    def _evict(self, wanted: Callable[[], bool]) -> list[str]:
        """Evicts free entries, least recently used first, while `wanted()` holds."""
        evicted = []
        for key, entry in list(self._entries.items()):
            if not wanted():
                break
            if entry.users == 0:
                del self._entries[key]
                self._free_pages.extend(reversed(entry.pages))
                self._free_entry_pages -= len(entry.pages)
                evicted.append(key)
        return evicted
