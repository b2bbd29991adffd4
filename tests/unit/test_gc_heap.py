"""The server's processes freeze their start-up heap for the collector (`ocula.utils.gc_heap`):
start-up's garbage is collected first, what lives on is skipped by later collections, and
`leave_group` still frees the frozen models and runners that hold a process group."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from ocula.distributed.launch import leave_group
from ocula.utils.gc_heap import freeze_startup_heap


class Node:
    """An object in a reference cycle with itself: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def unfrozen_after() -> Iterator[None]:
    yield
    gc.unfreeze()


def test_garbage_of_start_up_is_collected_and_the_rest_frozen(unfrozen_after) -> None:
    dropped, kept = Node(), Node()
    dropped_ref = weakref.ref(dropped)
    del dropped
    freeze_startup_heap("test")
    assert dropped_ref() is None  # collected before the freeze, not frozen for ever
    assert gc.get_freeze_count() > 0
    assert not any(o is kept for o in gc.get_objects())  # later collections skip it
    kept_ref = weakref.ref(kept)
    del kept
    gc.collect()
    assert kept_ref() is not None  # frozen cyclic garbage stays...
    leave_group()
    assert kept_ref() is None  # ...until a rank leaves its group (no torch.distributed here)


def test_collections_after_the_freeze_still_free_new_garbage(unfrozen_after) -> None:
    freeze_startup_heap("test")
    made_later = Node()
    ref = weakref.ref(made_later)
    del made_later
    gc.collect()
    assert ref() is None
