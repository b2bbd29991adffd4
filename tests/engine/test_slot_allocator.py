"""SlotAllocator: accounting, no partial allocation, the cheap guard and the debug checks."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ocula.engine.kv_pool import SCRATCH_SLOT
from ocula.engine.slot_allocator import SlotAllocator


def test_fresh_allocator_hands_out_every_slot_but_the_scratch_slot() -> None:
    allocator = SlotAllocator(8)
    assert (allocator.capacity, allocator.num_free, allocator.num_allocated) == (8, 8, 0)
    slots = allocator.alloc(8)
    assert slots is not None and slots.dtype == torch.int64 and slots.device.type == "cpu"
    assert slots.tolist() == list(range(1, 9))
    assert SCRATCH_SLOT not in slots.tolist()
    assert (allocator.num_free, allocator.num_allocated) == (0, 8)


def test_alloc_zero_gives_an_empty_tensor() -> None:
    allocator = SlotAllocator(4)
    slots = allocator.alloc(0)
    assert slots is not None and slots.shape == (0,) and slots.dtype == torch.int64
    assert allocator.num_free == 4


def test_alloc_never_gives_part_of_a_request() -> None:
    allocator = SlotAllocator(5)
    assert allocator.alloc(3) is not None
    assert allocator.alloc(3) is None
    assert allocator.num_free == 2
    assert allocator.alloc(2) is not None
    assert allocator.alloc(1) is None


def test_freed_slots_are_reused_and_accounting_adds_up() -> None:
    allocator = SlotAllocator(6, debug=True)
    first = allocator.alloc(4)
    assert first is not None
    allocator.free(first[1:3])
    assert allocator.num_free == 4
    again = allocator.alloc(4)
    assert again is not None
    assert sorted(again.tolist() + first[[0, 3]].tolist()) == list(range(1, 7))


def test_returned_tensor_does_not_alias_the_free_stack() -> None:
    allocator = SlotAllocator(4)
    slots = allocator.alloc(2)
    assert slots is not None
    kept = slots.tolist()
    allocator.free(torch.tensor([9, 9]))  # overwrites the stack where `slots` came from
    assert slots.tolist() == kept


def test_free_accepts_other_integer_dtypes_and_shapes() -> None:
    allocator = SlotAllocator(4, debug=True)
    slots = allocator.alloc(4)
    assert slots is not None
    allocator.free(slots.to(torch.int32).reshape(2, 2))
    assert allocator.num_free == 4


def test_free_of_an_empty_tensor_is_a_no_op() -> None:
    allocator = SlotAllocator(2)
    allocator.free(torch.empty(0, dtype=torch.int64))
    assert allocator.num_free == 2


def test_free_rejects_tensors_off_the_cpu() -> None:
    allocator = SlotAllocator(2)
    with pytest.raises(ValueError, match="CPU"):
        allocator.free(torch.empty(1, dtype=torch.int64, device="meta"))


def test_cheap_guard_rejects_freeing_more_than_is_outstanding() -> None:
    allocator = SlotAllocator(3)
    slots = allocator.alloc(1)
    assert slots is not None
    allocator.free(slots)
    with pytest.raises(RuntimeError, match="freed twice"):
        allocator.free(slots)
    assert allocator.num_free == 3


@pytest.mark.parametrize("foreign", [0, 5, -1])
def test_debug_mode_rejects_foreign_slots(foreign: int) -> None:
    allocator = SlotAllocator(4, debug=True)
    assert allocator.alloc(2) is not None
    with pytest.raises(ValueError, match=r"not in 1\.\.4"):
        allocator.free(torch.tensor([foreign]))
    assert allocator.num_free == 2


def test_debug_mode_rejects_double_frees() -> None:
    allocator = SlotAllocator(6, debug=True)
    slots = allocator.alloc(4)
    assert slots is not None
    allocator.free(slots[:1])
    with pytest.raises(ValueError, match="double free"):
        allocator.free(slots[:2])  # the cheap guard lets this through: 3 + 2 <= 6
    with pytest.raises(ValueError, match="twice in one free"):
        allocator.free(slots[1:2].repeat(2))
    assert allocator.num_free == 3
    allocator.free(slots[1:])
    assert allocator.num_free == 6


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        SlotAllocator(0)
    with pytest.raises(ValueError):
        SlotAllocator(2).alloc(-1)


@settings(max_examples=200, deadline=None)
@given(requests=st.lists(st.integers(min_value=0, max_value=7), max_size=40), data=st.data())
def test_random_alloc_and_free_match_a_set_model(requests: list[int], data: st.DataObject) -> None:
    capacity = 16
    allocator = SlotAllocator(capacity, debug=True)
    held: list[torch.Tensor] = []
    for num_tokens in requests:
        slots = allocator.alloc(num_tokens)
        outstanding = sum(int(s.numel()) for s in held)
        assert (slots is None) == (num_tokens > capacity - outstanding)
        if slots is not None:
            held.append(slots)
        if held and data.draw(st.booleans()):
            allocator.free(held.pop(data.draw(st.integers(0, len(held) - 1))))
        every_held = [s for t in held for s in t.tolist()]
        assert len(every_held) == len(set(every_held))
        assert all(1 <= s <= capacity for s in every_held)
        assert allocator.num_free == capacity - len(every_held)
    for slots in held:
        allocator.free(slots)
    assert allocator.num_free == capacity


def test_decode_slots_hand_out_what_single_allocs_would_and_give_back_the_rest() -> None:
    from ocula.engine.prefix_cache import RadixCache
    from ocula.engine.request_kv import DecodeSlots, RequestKV

    def kv_over(allocator: SlotAllocator) -> RequestKV:
        return RequestKV(allocator, RadixCache(allocator, enabled=False))

    single, batched = SlotAllocator(10), SlotAllocator(10)
    for allocator in (single, batched):  # a stack that is not in order any more
        taken = allocator.alloc(6)
        allocator.free(taken[[4, 1, 3]])
    expected = [int(single.alloc(1)) for _ in range(3)]
    held = DecodeSlots(kv_over(batched), 5)
    assert [held.take() for _ in range(3)] == expected
    held.give_back()  # two never handed out
    assert batched.num_free == single.num_free
    assert single.alloc(single.num_free).tolist() == batched.alloc(batched.num_free).tolist()
    assert held.take() is None
    # More than is free: nothing is taken, every decode falls back to single allocations.
    short = DecodeSlots(kv_over(SlotAllocator(2)), 3)
    assert short.take() is None


def test_table_writes_flatten_ranges_then_cells_and_pickle_flat() -> None:
    import pickle

    from ocula.engine.step_plan import SlotTableWrites

    writes = SlotTableWrites()
    writes.add(2, 5, torch.tensor([7, 8, 9]))
    writes.add_cell(0, 11, 4)
    writes.add(1, 0, torch.tensor([3]))
    writes.add_cell(3, 2, 6)
    expected = [[2, 2, 2, 1, 0, 3], [5, 6, 7, 0, 11, 2], [7, 8, 9, 3, 4, 6]]
    assert writes.flatten().tolist() == expected
    assert pickle.loads(pickle.dumps(writes)).flatten().tolist() == expected
    cells_only = SlotTableWrites()
    cells_only.add_cell(1, 1, 1)
    assert cells_only.flatten().tolist() == [[1], [1], [1]]
    assert SlotTableWrites().flatten() is None


@pytest.mark.parametrize("ranges", [1, 2, 4, 5, 9])
def test_table_writes_flatten_few_and_many_ranges_alike(ranges: int) -> None:
    """Up to FEW_RANGES ranges are written one by one, more in one vectorized pass: both give
    every range's cells in order (row, start + offset, slot), then the single cells."""
    from ocula.engine.step_plan import FEW_RANGES, SlotTableWrites

    assert FEW_RANGES in range(1, 9)
    writes = SlotTableWrites()
    expected: list[tuple[int, int, int]] = []
    for entry in range(ranges):
        length = entry % 3 + 1 if entry != 1 else 40
        slots = torch.arange(100 * entry, 100 * entry + length)
        writes.add(entry + 1, 7 * entry, slots)
        expected += [(entry + 1, 7 * entry + j, int(slots[j])) for j in range(length)]
    writes.add_cell(0, 3, 999)
    expected.append((0, 3, 999))
    assert writes.flatten().tolist() == [list(column) for column in zip(*expected, strict=True)]
