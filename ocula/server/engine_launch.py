"""The engine process, started before the front imports its own modules.

Both processes import torch, transformers and the engine (~4-5 s of a server's start on a
2-core machine); started after the front had imported everything, the engine process did its
imports only then, one after the other. `EngineLaunch` is made right after the port is bound:
it opens the channel's listening socket (`ChannelListener`) and spawns the engine, which imports
and loads the model while the front imports and builds its app; the engine's connection waits
in the socket's backlog until the front's event loop accepts it (`AsyncEngine.start`).

So nothing the front imports up to here may import torch: not this module (pickling its target
by reference imports it), not the flag parser (`ocula.config`), not `api_server` itself
(`tests/unit/test_startup_checks.py` holds them to it). With torch imported first, the front
spawned the engine ~4 s late: an idle tiny model's server was healthy after 7.5 s on a 2-core
machine, 3.8 s without (2026-12-07), and a bad flag took 5 s to be refused, 0.2 s without.
"""

from __future__ import annotations

import multiprocessing
from typing import Any

from ocula.server.channel_listener import ChannelListener

KILL_WAIT_SECONDS = 10.0


def _run_engine(args: Any, channel_path: str) -> None:
    """The spawned process's entry point."""
    from ocula.server.engine_process import run_engine_process

    run_engine_process(args, channel_path)


class EngineLaunch:
    """A started engine process and the socket it connects to; `AsyncEngine.start` adopts both.
    `abandon` stops and removes them when the front fails before that. With `start=False` the
    process starts on `start()`: the front's signal handler holds the launch before the spawn."""

    def __init__(self, args: Any, start: bool = True) -> None:
        self.listener = ChannelListener()
        spawn = multiprocessing.get_context("spawn")
        self.process = spawn.Process(
            target=_run_engine, args=(args, str(self.listener.path)), name="ocula-engine"
        )
        if start:
            self.start()

    def start(self) -> None:
        try:
            self.process.start()
        except BaseException:  # cut short once the engine was spawned: stop it too
            self.abandon()
            raise

    def abandon(self) -> None:
        """Kills the engine process (it has not been told anything yet) and removes the socket;
        safe before the start, during it and more than once."""
        if self.process.pid is not None:
            if self.process.is_alive():
                self.process.kill()
            self.process.join(KILL_WAIT_SECONDS)
        self.listener.close()
