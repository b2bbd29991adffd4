"""Prefix cache: a radix tree from token sequences to the KV slots that hold their K/V.

Key contract. A key is a sequence of hashable items, one per token position; two positions may
share KV only when their items are equal (==) and so are all items before them. Text tokens are
plain Python ints. Positions of an image span are keyed by tuples such as
`(image_md5, offset_in_span)`: all of them carry the same placeholder token id, yet two different
images must never share KV, and a tuple never equals an int. The tree never assumes items are
ints. Do not put in keys values whose == is not a plain bool (torch tensors, numpy arrays: turn
token tensors into lists with `.tolist()`), and do not mix bools or floats with ints (`1 == True`
and `1 == 1.0` in Python). Never stand in a truncated hash for a token id: collisions would share
KV between different images.

Ownership. Every slot is either free in the `SlotAllocator`, owned by exactly one request, or
owned by exactly one tree node (the node holds the K/V of the tokens on its edge). Slots move into
the tree only through `insert` and leave it only through `evict` and `reset`, which free them.

Locks. A request that uses cached slots locks the node `match_prefix` returned; a lock counts on
every node from there up to the root, and a node with a non-zero count is never evicted. A split
inserts a new node *above* an existing one (the existing node keeps its identity and the end of
its edge) and copies its lock count, so a handle to a locked node stays valid and exact.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from ocula.engine.slot_allocator import SlotAllocator


class RadixNode:
    """One edge of the tree: `key` (a tuple of items) and the `slots` holding its tokens' K/V."""

    def __init__(
        self, key: tuple[Hashable, ...], slots: torch.Tensor, parent: RadixNode | None, node_id: int
    ) -> None:
        self.key = key
        self.slots = slots  # int64 CPU, len(slots) == len(key)
        self.parent = parent  # None for the root and for a node that was evicted
        self.children: dict[Hashable, RadixNode] = {}  # first item of the child's key -> child
        self.lock_count = 0  # locks held on this node or any node below it
        self.last_access = 0  # tick of the cache's last match/insert through this node
        self.node_id = node_id  # creation order: the tie-breaker of the eviction heap

    def __len__(self) -> int:
        return len(self.key)

    def __repr__(self) -> str:
        return f"RadixNode(len={len(self.key)}, locks={self.lock_count}, children={len(self.children)})"


@dataclass
class PrefixMatch:
    slots: torch.Tensor  # int64 CPU [length]: the cached prefix's slots, still owned by the tree
    length: int  # how many leading items of the key are cached
    node: RadixNode  # the node whose edge ends exactly after `length` items (the root when 0)


def _common_prefix_length(edge: tuple[Hashable, ...], key: tuple[Hashable, ...], start: int) -> int:
    """How many leading items of `edge` equal key[start:]."""
    end = start + len(edge)
    if key[start:end] == edge:  # one C-level comparison in the common case of a whole edge
        return len(edge)
    length = 0
    for edge_item, key_item in zip(edge, key[start:end], strict=False):  # key may end first
        if edge_item != key_item:
            break
        length += 1
    return length


class RadixCache:
    """Radix tree of cached prefixes over the slots of one `SlotAllocator`.

    `enabled=False` (for `--disable_dynamic_prompt_cache`) keeps the same API and the same caller
    code: `match_prefix` always returns an empty match at the root and `insert` takes no slots and
    returns len(key), so a caller that frees "its own slots before the returned length" frees
    everything, exactly as it must with no cache.
    """

    def __init__(self, allocator: SlotAllocator, enabled: bool = True) -> None:
        self.allocator = allocator
        self.enabled = enabled
        self._node_ids = itertools.count()
        self._root = self._new_node((), torch.empty(0, dtype=torch.int64), parent=None)
        self._leaves: set[RadixNode] = set()  # every node without children except the root
        self._evictable_size = 0  # tokens in nodes with lock_count == 0
        self._protected_size = 0  # tokens in nodes with lock_count > 0
        self._tick = 0
        # Metrics: tokens asked for by match_prefix and tokens found cached.
        self.num_tokens_queried = 0
        self.num_tokens_hit = 0

    @property
    def root(self) -> RadixNode:
        return self._root

    @property
    def evictable_size(self) -> int:
        return self._evictable_size

    @property
    def protected_size(self) -> int:
        return self._protected_size

    @property
    def total_size(self) -> int:
        return self._evictable_size + self._protected_size

    @property
    def hit_rate(self) -> float:
        return self.num_tokens_hit / self.num_tokens_queried if self.num_tokens_queried else 0.0

    def match_prefix(self, key: Sequence[Hashable], count_in_stats: bool = True) -> PrefixMatch:
        """Finds the longest cached prefix of `key`. If it ends inside an edge, that edge is split
        so that `.node` ends exactly at `.length`. Marks the path as used now (LRU). The slots stay
        the tree's: lock `.node` before anything can evict, unlock it when done, never free them.
        The caller decides how much of `key` to pass (e.g. all but the last token when that token
        must be recomputed to get logits).
        Pass `count_in_stats=False` when re-matching a request already counted."""
        key = tuple(key)
        node, length = self._root, 0
        if self.enabled:
            node, length = self._walk(key, split_at_end=True)
        if count_in_stats:
            self.num_tokens_queried += len(key)
            self.num_tokens_hit += length
        return PrefixMatch(self._path_slots(node), length, node)

    def count_lookup(self, num_queried: int, num_hit: int) -> None:
        """Records one request's lookup in the hit-rate statistics (for callers that match with
        `count_in_stats=False` until they know the lookup is final)."""
        self.num_tokens_queried += num_queried
        self.num_tokens_hit += num_hit

    def insert(self, key: Sequence[Hashable], slots: torch.Tensor) -> int:
        """Caches `key` whose K/V are in `slots` (len(key) == len(slots)) and returns `num_kept`:
        the length of the prefix of `key` that was already cached (len(key) when disabled).

        Ownership: the tree takes slots[num_kept:]; the caller must no longer free or write them.
        slots[:num_kept] are not taken: they duplicate cached K/V. Of those, the ones the caller
        got from an earlier `match_prefix` (its first `match.length`) belong to the tree and must
        not be freed; the ones the caller allocated itself, slots[match.length:num_kept], are now
        redundant and the caller frees them. So with `matched = match.length` the caller does
        `allocator.free(slots[matched:num_kept])`, enabled or not (num_kept >= matched holds while
        the match's node stays locked). A request that keeps running after an insert re-matches
        its key and locks the new node, so its slot table points at the tree's slots, not freed
        ones."""
        key = tuple(key)
        if len(key) != len(slots):
            raise ValueError(f"insert got {len(key)} key items but {len(slots)} slots")
        if not self.enabled:
            return len(key)
        node, num_kept = self._walk(key, split_at_end=False)
        if num_kept < len(key):
            # `node` ends exactly at num_kept: _walk splits where an edge diverges from `key`.
            slots = slots.to(device="cpu", dtype=torch.int64)
            leaf = self._new_node(key[num_kept:], slots[num_kept:].clone(), parent=node)
            leaf.last_access = self._tick
            node.children[key[num_kept]] = leaf
            self._leaves.discard(node)
            self._leaves.add(leaf)
            self._evictable_size += len(leaf)
        return num_kept

    def lock(self, node: RadixNode) -> None:
        """Protects `node` and its ancestors from eviction until a matching `unlock(node)`.
        Lock the node of a match before anything can evict (an evicted node cannot be locked)."""
        if node is not self._root and node.parent is None:
            raise RuntimeError(f"lock of {node!r}, which was evicted")
        while node is not self._root:
            if node.lock_count == 0:
                self._evictable_size -= len(node)
                self._protected_size += len(node)
            node.lock_count += 1
            node = node.parent

    def unlock(self, node: RadixNode) -> None:
        """Releases one `lock(node)`. Unlocking more often than locking raises."""
        while node is not self._root:
            if node.lock_count == 0:
                raise RuntimeError(f"unlock of {node!r}, which is not locked")
            node.lock_count -= 1
            if node.lock_count == 0:
                self._protected_size -= len(node)
                self._evictable_size += len(node)
            node = node.parent

    def evict(self, num_tokens: int) -> int:
        """Frees at least `num_tokens` slots to the allocator if the unlocked part of the tree
        holds that many, least recently used leaves first; a parent left without children joins
        the candidates. Returns how many slots were freed (whole edges, so it may exceed)."""
        if num_tokens <= 0:
            return 0
        heap = [
            (leaf.last_access, leaf.node_id, leaf) for leaf in self._leaves if not leaf.lock_count
        ]
        heapq.heapify(heap)
        freed: list[torch.Tensor] = []
        num_freed = 0
        while num_freed < num_tokens and heap:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            assert parent is not None
            del parent.children[leaf.key[0]]
            leaf.parent = None
            self._leaves.discard(leaf)
            self._evictable_size -= len(leaf)
            freed.append(leaf.slots)
            num_freed += len(leaf)
            if parent is not self._root and not parent.children:
                self._leaves.add(parent)
                if parent.lock_count == 0:
                    heapq.heappush(heap, (parent.last_access, parent.node_id, parent))
        if freed:
            self.allocator.free(torch.cat(freed))
        return num_freed

    def reset(self) -> None:
        """Frees every cached slot. Only allowed while nothing is locked. Metrics are kept."""
        if self._protected_size:
            raise RuntimeError(f"reset with {self._protected_size} tokens still locked")
        self.evict(self._evictable_size)
        assert self.total_size == 0 and not self._root.children

    def reset_stats(self) -> None:
        """Starts the hit-rate statistics over."""
        self.num_tokens_queried = 0
        self.num_tokens_hit = 0

    def _walk(self, key: tuple[Hashable, ...], split_at_end: bool) -> tuple[RadixNode, int]:
        """Follows `key` from the root, marking each node passed as used now. Returns the deepest
        node whose edge ends at or before the end of the match, and the match length. An edge
        that diverges from `key` is split at the divergence; an edge that `key` ends inside is
        split only when `split_at_end` (match does, so its node is exact; insert needs no node
        there)."""
        self._tick += 1
        node, position = self._root, 0
        while position < len(key):
            child = node.children.get(key[position])
            if child is None:
                break
            matched = _common_prefix_length(child.key, key, position)
            position += matched
            if matched < len(child):
                if position == len(key) and not split_at_end:
                    child.last_access = self._tick
                    return node, position
                # Only the matched upper part is used now; the tail keeps its access time.
                upper = self._split(child, matched)
                upper.last_access = self._tick
                return upper, position
            child.last_access = self._tick
            node = child
        return node, position

    def _split(self, node: RadixNode, at: int) -> RadixNode:
        """Cuts `node`'s edge after `at` items (0 < at < len(node)) by inserting a new node above
        it; `node` keeps the tail and its children. Returns the new upper node."""
        parent = node.parent
        assert parent is not None and 0 < at < len(node)
        upper = self._new_node(node.key[:at], node.slots[:at], parent=parent)
        upper.lock_count = node.lock_count  # every lock through `node` also passes `upper`
        upper.last_access = node.last_access
        upper.children[node.key[at]] = node
        parent.children[node.key[0]] = upper
        node.key, node.slots, node.parent = node.key[at:], node.slots[at:], upper
        return upper

    def _new_node(
        self, key: tuple[Hashable, ...], slots: torch.Tensor, parent: RadixNode | None
    ) -> RadixNode:
        return RadixNode(key, slots, parent, node_id=next(self._node_ids))

    def _path_slots(self, node: RadixNode) -> torch.Tensor:
        parts: list[torch.Tensor] = []
        while node is not self._root:
            parts.append(node.slots)
            node = node.parent
        if not parts:
            return torch.empty(0, dtype=torch.int64)
        return torch.cat(parts[::-1])
