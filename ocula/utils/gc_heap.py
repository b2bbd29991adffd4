"""Keeping Python's cyclic garbage collector off the heap that torch and transformers build.

A server process that has imported torch and transformers (and, in the engine, built the model
and its CUDA graphs) holds millions of objects that live as long as it does. A full collection
traverses all of them: 0.18-0.21 s each in the front of a tiny model's server on the 2-core CPU
machine, two of them while it served 3,000 requests (2026-12-07; the event loop, every stream
with it, stands still meanwhile), and 0.28 s each in the engine process of InternVL3-8B on an
H100 host. `gc.freeze` moves every object alive to a permanent generation that collections skip:

- `freeze_startup_heap` runs once a process is ready to serve: later full collections traverse
  only what serving allocates;
- `freeze_heap_at_exit` skips the interpreter's last collections at exit (1.0 s of a process's
  exit on the CPU machine, 0.15 s frozen; a server's stop waits for the engine's exit and then
  the front's).

What freezing gives up: frozen objects that later become cyclic garbage are never reclaimed
(startup's garbage is collected just before the freeze, so this is whatever startup built and
serving later drops: bounded, once), and at exit nothing still alive is finalized (no `__del__`,
module globals included). Everything the server must release (sockets, the engine's channel,
child processes, process groups, temporary folders) is released explicitly before its entry
point returns, or by an atexit handler or `weakref.finalize`, which still run.
"""

from __future__ import annotations

import atexit
import gc
import logging

logger = logging.getLogger(__name__)


def freeze_startup_heap(process: str) -> None:
    """Collects startup's garbage, then freezes what is left: call it once `process` (a name
    for the log) is ready to serve."""
    gc.collect()
    gc.freeze()
    logger.info(
        "%s: %d objects of start-up frozen for the collector", process, gc.get_freeze_count()
    )


def freeze_heap_at_exit() -> None:
    """Registers `gc.freeze` to run at exit. atexit runs handlers last in, first out, so those
    registered before this call (by imports: logging's, multiprocessing's) run after the
    freeze; none of them needs a collection."""
    atexit.register(gc.freeze)
