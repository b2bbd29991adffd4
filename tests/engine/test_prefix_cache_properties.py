"""RadixCache under random sequences of match/insert/lock/unlock/evict, checked against a dict of
cached prefixes: ownership of every slot, lock counts, sizes, and a full release at the end."""

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ocula.engine.prefix_cache import RadixNode
from tests.engine.test_prefix_cache import make_cache

ITEMS = [0, 1, 2, ("img-a", 0), ("img-a", 1), ("img-b", 0)]
KEYS = st.lists(st.sampled_from(ITEMS), max_size=7).map(tuple)
CAPACITY = 24


def cached_prefixes(node: RadixNode, path: tuple = ()) -> dict[tuple, int]:
    """Every cached prefix below `node` -> the slot of its last item."""
    prefixes = {}
    for child in node.children.values():
        for i, (item, slot) in enumerate(zip(child.key, child.slots.tolist(), strict=True)):
            prefixes[(*path, *child.key[:i], item)] = slot
        prefixes.update(cached_prefixes(child, path + child.key))
    return prefixes


class PrefixCacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.allocator, self.cache = make_cache(CAPACITY)
        self.reference: dict[tuple, int] = {}  # cached prefix -> slot of its last item
        self.held: list[tuple[tuple, RadixNode]] = []  # (prefix, node) of each lock held

    def cached_length(self, key: tuple) -> int:
        return max(n for n in range(len(key) + 1) if n == 0 or key[:n] in self.reference)

    def check_match(self, key: tuple) -> tuple[int, RadixNode, torch.Tensor]:
        match = self.cache.match_prefix(key)
        assert match.length == self.cached_length(key)
        assert match.slots.tolist() == [self.reference[key[:n]] for n in range(1, match.length + 1)]
        return match.length, match.node, match.slots

    def sync_after_evict(self) -> None:
        remaining = cached_prefixes(self.cache.root)
        assert remaining.items() <= self.reference.items()
        for prefix, _ in self.held:
            assert all(prefix[:n] in remaining for n in range(1, len(prefix) + 1))
        self.reference = remaining

    @rule(keys=st.lists(KEYS, min_size=1, max_size=3))
    def serve_concurrent_requests(self, keys: list[tuple]) -> None:
        """All requests match and allocate first, then insert in turn: a later one may find part
        of its key cached by an earlier one and must free its own duplicates."""
        running = []
        for key in keys:
            matched, node, cached_slots = self.check_match(key)
            self.cache.lock(node)
            missing = len(key) - matched - self.allocator.num_free
            if missing > 0:
                self.cache.evict(missing)
                self.sync_after_evict()
            fresh = self.allocator.alloc(len(key) - matched)
            if fresh is None:
                self.cache.unlock(node)
                continue
            running.append((key, matched, node, torch.cat([cached_slots, fresh])))
        for key, matched, node, slots in running:
            expected_kept = self.cached_length(key)
            num_kept = self.cache.insert(key, slots)
            assert num_kept == expected_kept >= matched
            self.allocator.free(slots[matched:num_kept])
            for n in range(num_kept + 1, len(key) + 1):
                self.reference[key[:n]] = int(slots[n - 1])
            self.cache.unlock(node)

    @rule(key=KEYS)
    def lock_prefix(self, key: tuple) -> None:
        matched, node, _ = self.check_match(key)
        self.cache.lock(node)
        self.held.append((key[:matched], node))

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def unlock_one(self, data: st.DataObject) -> None:
        _, node = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        self.cache.unlock(node)

    @rule(num_tokens=st.integers(0, CAPACITY))
    def evict(self, num_tokens: int) -> None:
        evictable = self.cache.evictable_size
        freed = self.cache.evict(num_tokens)
        assert min(num_tokens, evictable) <= freed <= evictable
        self.sync_after_evict()

    @invariant()
    def tree_is_consistent(self) -> None:
        expected_locks: dict[int, int] = {}
        for _, node in self.held:
            while node is not self.cache.root:
                expected_locks[id(node)] = expected_locks.get(id(node), 0) + 1
                node = node.parent
        evictable = protected = 0
        tree_slots: list[int] = []
        stack = list(self.cache.root.children.values())
        while stack:
            node = stack.pop()
            assert len(node.key) == len(node.slots) > 0
            assert node.parent is not None and node.parent.children[node.key[0]] is node
            assert node.lock_count == expected_locks.get(id(node), 0)
            assert (node in self.cache._leaves) == (not node.children)
            protected += len(node) if node.lock_count else 0
            evictable += 0 if node.lock_count else len(node)
            tree_slots += node.slots.tolist()
            stack += node.children.values()
        assert (self.cache.evictable_size, self.cache.protected_size) == (evictable, protected)
        assert self.cache.total_size == len(tree_slots)
        assert cached_prefixes(self.cache.root) == self.reference
        # Every slot is either free or owned by exactly one node.
        free_slots = self.allocator.alloc(self.allocator.num_free)
        assert free_slots is not None
        assert sorted(tree_slots + free_slots.tolist()) == list(range(1, CAPACITY + 1))
        self.allocator.free(free_slots)

    def teardown(self) -> None:
        for _, node in self.held:
            self.cache.unlock(node)
        self.cache.evict(self.cache.total_size)
        assert self.cache.total_size == 0
        assert self.allocator.num_free == CAPACITY


PrefixCacheMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None
)
TestPrefixCacheMachine = PrefixCacheMachine.TestCase
