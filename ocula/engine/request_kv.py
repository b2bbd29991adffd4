"""A request's KV slots between the slot allocator and the prefix cache.

The scheduler decides which requests run; this class keeps their slots consistent with the
prefix cache: taking slots (evicting cached entries when the allocator runs dry), locking a
cached prefix at admission, handing computed KV to the cache, and releasing a request. Slot
re-pointings that the runner's slot table needs are queued here and shipped with the next plan.
"""

from __future__ import annotations

import torch

from ocula.engine.prefix_cache import RadixCache
from ocula.engine.request import Request
from ocula.engine.slot_allocator import SlotAllocator


class RequestKV:
    def __init__(self, allocator: SlotAllocator, prefix_cache: RadixCache) -> None:
        self.allocator = allocator
        self.prefix_cache = prefix_cache
        # Slot-table fixes found while applying a step's results, shipped with the next plan.
        # Keyed by request so that a request that stops before then takes its fix with it.
        self._pending_repoints: dict[str, tuple[int, int, torch.Tensor]] = {}
        # Running requests whose computed prompt goes to the prefix cache at the next plan.
        self._prompts_to_cache: dict[str, Request] = {}

    def cache_prompt_at_next_plan(self, request: Request) -> None:
        """Queues `cache_computed_tokens(request, keep_running=True)` for the start of the next
        plan (`start_plan`) instead of now, so that the step's tokens reach the front before
        this bookkeeping runs. Nothing is admitted in between, so requests that arrive meanwhile
        still find the prompt; one that stops first has `release` cache it instead."""
        self._prompts_to_cache[request.request_id] = request

    def start_plan(self) -> list[tuple[int, int, torch.Tensor]]:
        """Called first by each plan: caches the queued prompts, then returns the (table row,
        first column, slots) writes the plan must carry; clears both."""
        for request in self._prompts_to_cache.values():
            self.cache_computed_tokens(request, keep_running=True)
        self._prompts_to_cache.clear()
        repoints = list(self._pending_repoints.values())
        self._pending_repoints.clear()
        return repoints

    def allocate(self, num_slots: int) -> torch.Tensor | None:
        slots = self.allocator.alloc(num_slots)
        if slots is None:
            self.prefix_cache.evict(num_slots - self.allocator.num_free)
            slots = self.allocator.alloc(num_slots)
        return slots

    def match_prefix(self, request: Request) -> int:
        """Locks the longest cached prefix of a waiting request; returns its length. Hit-rate
        statistics are counted at admission, not here (a blocked request is matched again)."""
        # At least one token must be computed to produce the next token's logits; a request
        # that does not read the cache computes every prompt position.
        end = request.num_tokens - 1 if request.reads_prefix_cache else 0
        match = self.prefix_cache.match_prefix(request.cache_key(end), count_in_stats=False)
        self.prefix_cache.lock(match.node)
        request.prefix_node = match.node
        request.set_prefix_slots(match.slots)
        request.num_computed_tokens = request.num_tree_tokens = match.length
        request.num_scheduled_tokens = match.length
        return match.length

    def unlock_prefix(self, request: Request) -> None:
        if request.prefix_node is not None:
            self.prefix_cache.unlock(request.prefix_node)
        request.prefix_node = None
        request.num_computed_tokens = request.num_tree_tokens = 0
        request.num_scheduled_tokens = 0

    def cache_computed_tokens(self, request: Request, keep_running: bool) -> None:
        """Hands the request's computed KV to the prefix cache.

        If the request keeps running, it re-points its slot row at the cache's copy of any tokens
        the cache already had (shipped with the next plan), frees its duplicates and locks the new
        path. Otherwise only its reference is dropped. A step already launched may still read
        the freed duplicates: a new owner writes them only in a later step, after it in the
        device's stream order.
        """
        cache = self.prefix_cache
        num_computed = request.num_computed_tokens
        key = request.cache_key(num_computed)
        slots = request.kv_slots
        already_cached = cache.insert(key, slots)
        if already_cached > request.num_tree_tokens:
            self.allocator.free(slots[request.num_tree_tokens : already_cached].clone())
        old_node = request.prefix_node
        if keep_running:
            match = cache.match_prefix(key, count_in_stats=False)
            cache.lock(match.node)
            stale_from = request.num_tree_tokens
            request.set_prefix_slots(match.slots)
            if already_cached > stale_from:
                self._pending_repoints[request.request_id] = (
                    request.table_row,
                    stale_from,
                    match.slots[stale_from:already_cached].clone(),
                )
            request.prefix_node = match.node
            request.num_tree_tokens = num_computed
        if old_node is not None:
            cache.unlock(old_node)

    def release(self, request: Request) -> None:
        """Gives up all of a request's slots: computed ones to the prefix cache (or freed),
        those of tokens still being computed freed (stream order keeps a step in flight safe)."""
        self._pending_repoints.pop(request.request_id, None)
        self._prompts_to_cache.pop(request.request_id, None)
        in_flight = request.in_flight_slots()
        if len(in_flight):
            self.allocator.free(in_flight.clone())
        self.cache_computed_tokens(request, keep_running=False)


class DecodeSlots:
    """Slots taken in one allocation for the decodes of a step, handed out one at a time.

    A decode step needs one slot per running request; taking them one `alloc` at a time cost
    several tensor operations per request (about 10 us each on a GPU host, a third of the
    scheduler's time at batch 256). The hand-out order is the one single allocations would
    have had, and `give_back` returns what was not handed out so that the allocator's stack is
    as if those slots had never been taken.
    """

    def __init__(self, kv: RequestKV, count: int) -> None:
        self.allocator = kv.allocator
        slots = kv.allocate(count) if count > 0 else None
        self._slots = slots
        self._values: list[int] = slots.tolist() if slots is not None else []
        self._next = 0

    def take(self) -> int | None:
        """A slot, or None once none is left (or none could be taken)."""
        if self._next >= len(self._values):
            return None
        self._next += 1
        return self._values[self._next - 1]

    def give_back(self) -> None:
        """Returns the slots not handed out (in the stack order they were taken from)."""
        if self._slots is not None and self._next < len(self._values):
            self.allocator.free(self._slots[self._next :].flip(0))
        self._slots, self._values, self._next = None, [], 0
