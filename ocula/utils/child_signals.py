"""Signals in the server's child processes (the engine, tensor-parallel ranks).

A terminal's Ctrl-C (SIGINT) and a service manager's stop (systemd's SIGTERM to the whole
control group, `kill -TERM -PGID`) reach every process of the server at once. The front owns
the shutdown: it drains the requests in flight, then stops the engine, which stops its ranks.
A child that took the signal's default action would die under the drain and fail every request
in flight. So a child ignores SIGINT and takes SIGTERM only once its parent is gone; and on
Linux it asks the kernel for a SIGTERM (a tensor-parallel rank: SIGKILL) when its parent dies,
so that a child still loading the model stops with its parent instead of at its first message
to it. Once the child's loop runs
(`loop_watches_parent`), that loop sees its parent's death itself and leaves in order (rank 0
stops its ranks first: a rank blocked in a collective runs no Python signal handler), so the
signal is left to it.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import signal
import sys
from types import FrameType

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def loop_watches_parent() -> None:
    """From now on this process's loop checks that its parent lives and leaves in order when it
    does not: SIGTERM is ignored from here on."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def follow_parent_on_signals(death_signal: int = signal.SIGTERM) -> None:
    """Installs this child process's SIGINT / SIGTERM handling (see the module's docstring);
    `death_signal` is what the kernel sends when the parent dies (a tensor-parallel rank asks
    for SIGKILL: one blocked in a collective of a dead rank 0 runs no handler and would wait
    out the collective's timeout). Call it first thing in the child's entry point, from its main
    thread (the death signal follows the thread that started the child)."""
    parent = multiprocessing.parent_process()
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        if parent is not None and parent.is_alive():
            return
        logger.info("SIGTERM with the parent process gone: exiting")
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    _ask_for_signal_when_parent_dies(death_signal)
    if parent is not None and not parent.is_alive():  # it died before the request above
        raise SystemExit(128 + signal.SIGTERM)


def _ask_for_signal_when_parent_dies(death_signal: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(death_signal), 0, 0, 0) != 0:
            logger.debug("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    except (OSError, AttributeError):  # no libc symbol: the parent checks between steps remain
        pass
