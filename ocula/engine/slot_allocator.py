"""Which KV slots of the pool are free: a stack of slot indices in one CPU int64 tensor.

Slots are numbered 1..capacity; slot 0 is the pool's scratch slot (`kv_pool.SCRATCH_SLOT`) and is
never handed out. `alloc` and `free` do O(1) Python work however many slots they move (one tensor
slice each), so the scheduler can call them per request per step.

Ownership: a slot returned by `alloc` belongs to the caller until it is passed to `free` exactly
once. Outside debug mode only a cheap guard runs (freeing more slots than can be outstanding);
`debug=True` also tracks every slot and rejects double frees and slots that this allocator never
handed out (tests use it; it costs a few tensor ops per call).
"""

from __future__ import annotations

import torch


class SlotAllocator:
    def __init__(self, num_slots: int, debug: bool = False) -> None:
        if num_slots < 1:
            raise ValueError(f"a slot allocator needs at least one slot, got {num_slots}")
        self._capacity = num_slots
        # _free_stack[:_num_free] are the free slots; the top of the stack is handed out first.
        # Reversed so that a fresh allocator hands out 1, 2, 3, ... (easier to read in tests).
        self._free_stack = torch.arange(num_slots, 0, -1, dtype=torch.int64)
        self._num_free = num_slots
        # Debug mode only: _is_allocated[s] is True while slot s belongs to a caller.
        self._is_allocated = torch.zeros(num_slots + 1, dtype=torch.bool) if debug else None

    @property
    def capacity(self) -> int:
        """How many slots this allocator manages (the scratch slot 0 not included)."""
        return self._capacity

    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def num_allocated(self) -> int:
        return self._capacity - self._num_free

    def alloc(self, num_tokens: int) -> torch.Tensor | None:
        """Takes `num_tokens` free slots (int64 CPU tensor of that length), or returns None, and
        takes nothing, when fewer are free. `alloc(0)` returns an empty tensor."""
        if num_tokens < 0:
            raise ValueError(f"cannot allocate a negative number of slots ({num_tokens})")
        if num_tokens > self._num_free:
            return None
        start = self._num_free - num_tokens
        # flip() copies, so the caller's tensor never aliases the stack (later frees overwrite it);
        # the reversal keeps a fresh allocator's slots in ascending order.
        slots = self._free_stack[start : self._num_free].flip(0)
        self._num_free = start
        if self._is_allocated is not None:
            self._is_allocated[slots] = True
        return slots

    def free(self, slots: torch.Tensor) -> None:
        """Returns `slots` (any integer dtype, CPU, any shape) to the free stack. Each slot must
        have come from `alloc` and must not be freed twice (checked only in debug mode)."""
        if slots.device.type != "cpu":
            raise ValueError(f"slots to free must be a CPU tensor, got one on {slots.device}")
        slots = slots.reshape(-1).to(torch.int64)
        num_slots = int(slots.numel())
        if num_slots == 0:
            return
        if self._num_free + num_slots > self._capacity:
            raise RuntimeError(
                f"freeing {num_slots} slots with {self._num_free} of {self._capacity} already "
                "free: some slot is freed twice or does not belong to this allocator"
            )
        if self._is_allocated is not None:
            self._check_owned_by_caller(slots)
            self._is_allocated[slots] = False
        self._free_stack[self._num_free : self._num_free + num_slots] = slots
        self._num_free += num_slots

    def _check_owned_by_caller(self, slots: torch.Tensor) -> None:
        assert self._is_allocated is not None
        out_of_range = (slots < 1) | (slots > self._capacity)
        if bool(out_of_range.any()):
            bad = slots[out_of_range][:8].tolist()
            raise ValueError(f"slots {bad} are not in 1..{self._capacity}")
        if int(torch.unique(slots).numel()) != int(slots.numel()):
            raise ValueError("the same slot appears twice in one free() call")
        not_allocated = ~self._is_allocated[slots]
        if bool(not_allocated.any()):
            bad = slots[not_allocated][:8].tolist()
            raise ValueError(f"slots {bad} are already free (double free)")
