"""A file descriptor that becomes readable when an image's tiling finishes.

The engine process's loop sleeps in `poll` on the front's channel while it has nothing to step.
When every waiting request is waiting for its tiles (made in worker threads), the loop must
also wake up as soon as one tiling is done, without polling on a timer: each finished tiling
writes a byte to a pipe whose read end the loop polls beside the channel. Created on first use
of `fileno`, so in-process engines (which wait on the futures themselves) open no pipe.
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import Future
from typing import Any


class TilingSignal:
    def __init__(self) -> None:
        self._fds: tuple[int, int] | None = None
        self._lock = threading.Lock()

    def fileno(self) -> int:
        """The pipe's read end (non-blocking); a byte arrives each time a tiling finishes from
        now on. Whoever polls it reads it empty."""
        with self._lock:
            if self._fds is None:
                read_fd, write_fd = os.pipe()
                os.set_blocking(read_fd, False)
                os.set_blocking(write_fd, False)
                self._fds = (read_fd, write_fd)
            return self._fds[0]

    def notify(self, _done: Future[Any] | None = None) -> None:
        """A tiling finished (a future's done-callback, run in the worker thread)."""
        fds = self._fds
        if fds is not None:
            # A full pipe already holds a wake-up; a closed one has nobody left to wake.
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(fds[1], b"\0")

    def close(self) -> None:
        with self._lock:
            fds, self._fds = self._fds, None
        for fd in fds or ():
            os.close(fd)
