"""RadixCache: match/insert/split, the ownership contract of insert, locks, LRU eviction, image
keys and the disabled cache (the randomized state machine is in test_prefix_cache_properties)."""

from collections.abc import Hashable, Sequence

import pytest
import torch

from ocula.engine.prefix_cache import RadixCache, RadixNode
from ocula.engine.slot_allocator import SlotAllocator


def make_cache(capacity: int = 64, enabled: bool = True) -> tuple[SlotAllocator, RadixCache]:
    allocator = SlotAllocator(capacity, debug=True)
    return allocator, RadixCache(allocator, enabled=enabled)


def serve(cache: RadixCache, key: Sequence[Hashable]) -> torch.Tensor:
    """What the scheduler does for one request: reuse the cached prefix, compute the rest into
    fresh slots, then cache it all. Returns the slots of the whole key."""
    match = cache.match_prefix(key)
    cache.lock(match.node)
    fresh = cache.allocator.alloc(len(key) - match.length)
    assert fresh is not None
    slots = torch.cat([match.slots, fresh])
    num_kept = cache.insert(key, slots)
    cache.allocator.free(slots[match.length : num_kept])
    cache.unlock(match.node)
    return slots


def edges(node: RadixNode) -> dict[tuple, dict]:
    """The tree below `node` as nested dicts keyed by edge."""
    return {child.key: edges(child) for child in node.children.values()}


def assert_no_leak(allocator: SlotAllocator, cache: RadixCache) -> None:
    assert allocator.num_free + cache.total_size == allocator.capacity


def test_empty_cache_matches_nothing() -> None:
    _, cache = make_cache()
    match = cache.match_prefix([1, 2, 3])
    assert (match.length, match.slots.tolist(), match.node) == (0, [], cache.root)
    assert cache.match_prefix([]).length == 0


def test_match_returns_the_longest_cached_prefix_and_its_slots() -> None:
    allocator, cache = make_cache()
    slots = serve(cache, [1, 2, 3, 4])
    assert cache.match_prefix([1, 2, 3, 4, 5]).slots.tolist() == slots.tolist()
    assert cache.match_prefix([1, 2, 3, 4]).length == 4
    assert cache.match_prefix([9, 1, 2]).length == 0
    assert_no_leak(allocator, cache)


def test_match_ending_inside_an_edge_splits_it() -> None:
    _, cache = make_cache()
    slots = serve(cache, [1, 2, 3, 4, 5, 6])
    match = cache.match_prefix([1, 2, 3, 7])
    assert match.length == 3 and match.slots.tolist() == slots[:3].tolist()
    assert match.node.key == (1, 2, 3)
    assert edges(cache.root) == {(1, 2, 3): {(4, 5, 6): {}}}
    assert cache.match_prefix([1, 2]).node.key == (1, 2)
    assert edges(cache.root) == {(1, 2): {(3,): {(4, 5, 6): {}}}}
    assert cache.match_prefix([1, 2, 3, 4, 5, 6]).slots.tolist() == slots.tolist()
    assert (cache.total_size, cache.evictable_size) == (6, 6)


def test_insert_returns_the_length_that_was_already_cached() -> None:
    allocator, cache = make_cache()
    first = serve(cache, [1, 2, 3, 4])
    # The tree takes slots[4:] only; slots[:4] are the tree's own (from the match).
    match = cache.match_prefix([1, 2, 3, 4, 5, 6])
    fresh = allocator.alloc(2)
    assert fresh is not None
    assert cache.insert([1, 2, 3, 4, 5, 6], torch.cat([match.slots, fresh])) == 4
    assert cache.match_prefix([1, 2, 3, 4, 5, 6]).slots.tolist() == [
        *first.tolist(),
        *fresh.tolist(),
    ]
    # Divergence inside an edge splits it there.
    assert cache.insert([1, 2, 9], torch.cat([first[:2], allocator.alloc(1)])) == 2
    assert edges(cache.root) == {(1, 2): {(3, 4): {(5, 6): {}}, (9,): {}}}
    # A key that ends inside an edge is wholly cached: nothing taken, no split needed.
    assert cache.insert([1, 2, 3], first[:3]) == 3
    assert edges(cache.root) == {(1, 2): {(3, 4): {(5, 6): {}}, (9,): {}}}
    assert_no_leak(allocator, cache)


def test_caller_frees_its_own_duplicate_slots_when_another_request_cached_them_first() -> None:
    allocator, cache = make_cache(capacity=8)
    key = [5, 6, 7]
    own_slots = []
    for _ in range(2):  # two requests with the same prompt run at once: neither finds a prefix
        assert cache.match_prefix(key).length == 0
        own_slots.append(allocator.alloc(3))
    assert cache.insert(key, own_slots[0]) == 0
    num_kept = cache.insert(key, own_slots[1])
    assert num_kept == 3
    allocator.free(own_slots[1][0:num_kept])  # [match.length : num_kept] with match.length == 0
    assert cache.match_prefix(key).slots.tolist() == own_slots[0].tolist()
    assert_no_leak(allocator, cache)


def test_insert_rejects_a_length_mismatch() -> None:
    _, cache = make_cache()
    with pytest.raises(ValueError, match="2 key items but 3 slots"):
        cache.insert([1, 2], torch.tensor([1, 2, 3]))


def test_lock_protects_the_path_and_survives_splits() -> None:
    allocator, cache = make_cache()
    serve(cache, [1, 2, 3, 4, 5, 6])
    locked = cache.match_prefix([1, 2, 3, 4, 5, 6]).node
    cache.lock(locked)
    assert (cache.protected_size, cache.evictable_size) == (6, 0)
    cache.match_prefix([1, 2])  # splits the locked edge above `locked`
    cache.match_prefix([1, 2, 3, 4])
    serve(cache, [1, 2, 3, 9])  # a sibling below a locked ancestor
    assert (cache.protected_size, cache.evictable_size) == (6, 1)
    assert cache.evict(100) == 1
    assert cache.match_prefix([1, 2, 3, 4, 5, 6]).length == 6
    cache.unlock(locked)
    assert (cache.protected_size, cache.evictable_size) == (0, 6)
    assert cache.evict(1) == 2  # a whole edge: (5, 6)
    assert cache.evict(4) == 4  # (3, 4), then (3,) and (1, 2) as each becomes a leaf
    assert_no_leak(allocator, cache)
    assert allocator.num_free == allocator.capacity


def test_locks_are_inherited_when_the_locked_edge_itself_is_split() -> None:
    _, cache = make_cache()
    serve(cache, [1, 2, 3, 4])
    upper = cache.match_prefix([1, 2]).node
    cache.lock(upper)
    cache.lock(upper)
    cache.match_prefix([1])  # splits `upper` itself: the new node above it inherits both locks
    assert (cache.protected_size, cache.evictable_size) == (2, 2)
    cache.unlock(upper)
    assert cache.protected_size == 2
    cache.unlock(upper)
    assert (cache.protected_size, cache.evictable_size) == (0, 4)
    with pytest.raises(RuntimeError, match="not locked"):
        cache.unlock(upper)


def test_evict_takes_least_recently_used_leaves_first() -> None:
    _, cache = make_cache()
    for key in ([1, 1], [2, 2], [3, 3]):
        serve(cache, key)
    cache.match_prefix([1, 1])  # [2, 2] is now the oldest
    assert cache.evict(1) == 2
    assert [
        cache.match_prefix(k, count_in_stats=False).length for k in ([1, 1], [2, 2], [3, 3])
    ] == [2, 0, 2]
    cache.match_prefix([1, 1])
    assert cache.evict(2) == 2
    assert cache.match_prefix([3, 3]).length == 0 and cache.match_prefix([1, 1]).length == 2


def test_a_match_that_splits_an_edge_refreshes_only_the_matched_part() -> None:
    _, cache = make_cache()
    serve(cache, [1, 2, 3, 4])
    serve(cache, [9, 9])
    cache.match_prefix([1, 2])  # (1, 2) is now the newest node; its tail (3, 4) the oldest
    assert cache.evict(1) == 2
    assert edges(cache.root) == {(1, 2): {}, (9, 9): {}}
    assert cache.evict(1) == 2
    assert edges(cache.root) == {(1, 2): {}}


def test_parents_become_leaves_and_are_evicted_in_their_turn() -> None:
    allocator, cache = make_cache()
    serve(cache, [1, 2, 3])
    serve(cache, [1, 2, 4])
    serve(cache, [7, 8])
    cache.match_prefix([1, 2])  # the shared parent is recent, its leaves are old
    assert cache.evict(2) == 2  # leaves (3,) and (4,)
    assert edges(cache.root) == {(1, 2): {}, (7, 8): {}}
    assert cache.evict(1) == 2  # (7, 8) is older than the parent, now a leaf
    assert edges(cache.root) == {(1, 2): {}}
    assert cache.evict(5) == 2 and allocator.num_free == allocator.capacity


def test_evicted_node_cannot_be_locked_and_evict_of_nothing_is_a_no_op() -> None:
    _, cache = make_cache()
    serve(cache, [1, 2])
    node = cache.match_prefix([1, 2]).node
    assert cache.evict(0) == 0
    assert cache.evict(1) == 2
    with pytest.raises(RuntimeError, match="evicted"):
        cache.lock(node)


def test_image_items_never_match_ints_or_other_images() -> None:
    _, cache = make_cache()
    image_a = [("md5-a", offset) for offset in range(3)]
    image_b = [("md5-b", offset) for offset in range(3)]
    slots_a = serve(cache, [1, *image_a, 2])
    assert cache.match_prefix([1, *image_b, 2]).length == 1
    assert cache.match_prefix([1, 0, 1, 2, 2]).length == 1
    assert cache.match_prefix([1, *image_a[:2], ("md5-a", 5)]).length == 3
    slots_b = serve(cache, [1, *image_b, 2])
    assert cache.match_prefix([1, *image_a, 2]).slots.tolist() == slots_a.tolist()
    assert set(slots_a[1:].tolist()).isdisjoint(slots_b[1:].tolist())


def test_hit_rate_counts_queried_and_cached_tokens() -> None:
    _, cache = make_cache()
    assert cache.hit_rate == 0.0
    serve(cache, [1, 2, 3, 4])  # queries 4, hits 0
    cache.match_prefix([1, 2, 5, 6])  # queries 4, hits 2
    cache.match_prefix([1, 2, 3, 4], count_in_stats=False)
    assert (cache.num_tokens_queried, cache.num_tokens_hit) == (8, 2)
    assert cache.hit_rate == 0.25


def test_reset_frees_everything_but_refuses_while_locked() -> None:
    allocator, cache = make_cache()
    serve(cache, [1, 2, 3])
    serve(cache, [4, 5])
    node = cache.match_prefix([4, 5]).node
    cache.lock(node)
    with pytest.raises(RuntimeError, match="locked"):
        cache.reset()
    cache.unlock(node)
    cache.reset()
    assert cache.total_size == 0 and edges(cache.root) == {}
    assert allocator.num_free == allocator.capacity


def test_disabled_cache_keeps_nothing_and_the_caller_frees_everything() -> None:
    allocator, cache = make_cache(enabled=False)
    for _ in range(3):
        serve(cache, [1, 2, 3])  # the same caller code as with a cache
        assert allocator.num_free == allocator.capacity
    match = cache.match_prefix([1, 2, 3])
    assert (match.length, match.node) == (0, cache.root)
    assert cache.total_size == 0 and cache.num_tokens_queried == 12 and cache.num_tokens_hit == 0
