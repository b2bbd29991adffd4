"""A child of the server (the engine, a tensor-parallel rank) and its parent's death: once its
loop runs it ignores SIGTERM (the loop watches the parent), so a rank, whose loop may block in a
collective of a dead rank 0, asks the kernel for SIGKILL instead."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time

import psutil
import pytest

from ocula.utils.child_signals import follow_parent_on_signals, loop_watches_parent

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG")


def _looping_child(death_signal: int) -> None:
    follow_parent_on_signals(death_signal)
    loop_watches_parent()
    time.sleep(60)  # a loop blocked where no Python handler runs


def _parent_that_dies(death_signal: int, pids: multiprocessing.Queue) -> None:
    child = multiprocessing.get_context("spawn").Process(
        target=_looping_child, args=(death_signal,), daemon=False
    )
    child.start()
    time.sleep(2.0)  # the child has installed its signals
    pids.put(child.pid)
    pids.close()
    pids.join_thread()  # the pid is sent before the exit below skips every cleanup
    os._exit(0)  # as if killed


def orphan_of_a_dead_parent(death_signal: int) -> psutil.Process | None:
    """The child left behind 1.5 s after its parent died, or None when it went too."""
    spawn = multiprocessing.get_context("spawn")
    pids = spawn.Queue()
    parent = spawn.Process(target=_parent_that_dies, args=(death_signal, pids))
    parent.start()
    child = psutil.Process(pids.get(timeout=60))
    parent.join(30)
    time.sleep(1.5)
    try:
        return child if child.status() != psutil.STATUS_ZOMBIE else None
    except psutil.NoSuchProcess:
        return None


def test_a_rank_dies_with_its_parent_even_in_its_loop() -> None:
    assert orphan_of_a_dead_parent(signal.SIGKILL) is None


def test_sigterm_alone_leaves_a_looping_child_to_its_loop() -> None:
    """The contract the rank's SIGKILL works around: the engine's loop sees its front gone."""
    orphan = orphan_of_a_dead_parent(signal.SIGTERM)
    assert orphan is not None
    orphan.kill()
