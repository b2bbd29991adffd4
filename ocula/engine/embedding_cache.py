"""Which image embeddings the engine holds: an LRU over image keys with reference counts.

This is the scheduler's (CPU) view; the tensors live in the model runner, keyed the same way.
The scheduler tells the runner what to encode and what to drop through the step plan, so both
sides always agree on the set of keys.

Key: MD5 of the image bytes plus every preprocessing parameter that changes the embedding (tile
cap, thumbnail, image size), so the same bytes tiled differently are different entries.

Contract:
- `acquire(key)` marks an entry used by one more request; `release(key)` undoes it. An entry
  with users is never evicted, even when that leaves the cache above capacity for a while
  (requests in flight must keep their embeddings); the excess is dropped as soon as it is free.
- `add(key)` registers an entry the runner is about to encode, already acquired by the request
  that needs it; it returns the keys evicted to make room (least recently used first), which
  the runner must free.
"""

from __future__ import annotations

from collections import OrderedDict


class EmbeddingCacheIndex:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(
                f"the image embedding cache needs a capacity of at least 1, got {capacity}"
            )
        self.capacity = capacity
        self._users: OrderedDict[str, int] = OrderedDict()  # key -> requests using it, LRU first
        self.hits = 0
        self.misses = 0

    def __contains__(self, key: str) -> bool:
        return key in self._users

    def __len__(self) -> int:
        return len(self._users)

    @property
    def num_in_use(self) -> int:
        return sum(1 for users in self._users.values() if users > 0)

    def lookup(self, key: str) -> bool:
        """Counts a hit or a miss for an image of a new request; refreshes a hit's recency."""
        if key in self._users:
            self.hits += 1
            self._users.move_to_end(key)
            return True
        self.misses += 1
        return False

    def add(self, key: str) -> list[str]:
        """Registers `key` (not yet present) with one user; returns the keys evicted for room."""
        if key in self._users:
            raise ValueError(f"image {key} is already cached")
        self._users[key] = 1
        return self._evict_excess()

    def acquire(self, key: str) -> None:
        self._users[key] += 1
        self._users.move_to_end(key)

    def release(self, key: str) -> list[str]:
        """One request stopped using `key`; returns keys evicted because the cache was over."""
        users = self._users[key]
        if users <= 0:
            raise RuntimeError(f"release of image {key}, which no request holds")
        self._users[key] = users - 1
        return self._evict_excess()

    def _evict_excess(self) -> list[str]:
        evicted = []
        excess = len(self._users) - self.capacity
        if excess <= 0:
            return evicted
        for key, users in list(self._users.items()):
            if excess == 0:
                break
            if users == 0:
                del self._users[key]
                evicted.append(key)
                excess -= 1
        return evicted
