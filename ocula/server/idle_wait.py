"""How the server's two processes wait for work: spinning (polling without sleeping) or sleeping.

A process that sleeps between requests wakes up cold: its core left for a deep idle state or
another tenant's work, and its caches lost the request path's code and data
(`benchmarks/host_warmth.py`: on the 2-core CPU machine, a KVM guest, the prompt's tokenizing
took 0.12 ms back to back, 0.53-0.75 ms after a 50 ms sleep and 0.17-0.23 ms after 50 ms of
spinning). An idle request crosses both processes several times. Spinning keeps one core busy
per process, as SGLang's scheduler does unless `--sleep-on-idle`. `--idle_wait auto` spins when
the model runs on a GPU and sleeps on a CPU device, where a spinning core is one the model's
own threads do not get. The default is `sleep`: on an H100 host with servers alternating
(BENCHMARKS.md, twenty-seventh session) spinning took ~0.1 ms off the hop from the front to
the engine and nothing measurable off the TTFT (20.9 against 21.4 ms for a new image, 10.4 both
for a repeated prompt), while it holds two cores busy.

- The engine process (`engine_process.py`) polls its channel without a timeout while it has no
  request (`receive_spinning`).
- The front's event loop (`FrontSpin`) runs a task that yields to the loop at once, over and
  over, so that the loop never blocks in its poll; it pauses while a worker thread of the loop's
  default executor runs (an image decoding, a long prompt's tokenizing), whose Python parts would
  otherwise wait for the GIL behind the spinning loop (a 448 px image's decoding and tiling took
  2.9 ms instead of 2.3 on the CPU machine).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

IDLE_WAIT_CHOICES = ("auto", "spin", "sleep")


def spins_when_idle(idle_wait: str, device_type: str) -> bool:
    """Whether the server's processes spin while idle: `--idle_wait` and the engine's device."""
    if idle_wait not in IDLE_WAIT_CHOICES:
        raise ValueError(f"--idle_wait must be one of {IDLE_WAIT_CHOICES}, got {idle_wait!r}")
    return idle_wait == "spin" or (idle_wait == "auto" and device_type == "cuda")


def receive_spinning(receive: Callable[[int], list[Any]], seconds: float) -> list[Any]:
    """Calls `receive(0)` (a channel's non-blocking read) until it returns messages or
    `seconds` have passed; what the last call returned."""
    deadline = time.monotonic() + seconds
    while True:
        messages = receive(0)
        if messages or time.monotonic() >= deadline:
            return messages


class CountingThreadPool(ThreadPoolExecutor):
    """A thread pool that knows how many of its tasks are queued or running (`in_flight`) and
    tells an event loop when that falls to zero (`wait_idle`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._loop = loop
        self._lock = threading.Lock()
        self._idle = asyncio.Event()
        self.in_flight = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        with self._lock:
            self.in_flight += 1
        try:
            future = super().submit(fn, *args, **kwargs)
        except BaseException:
            self._finished(None)
            raise
        future.add_done_callback(self._finished)
        return future

    def _finished(self, _: Future | None) -> None:
        with self._lock:
            self.in_flight -= 1
            idle = self.in_flight == 0
        if idle:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                self._loop.call_soon_threadsafe(self._idle.set)

    async def wait_idle(self) -> None:
        """Returns once no task is in flight (at once if none is). Event-loop thread only."""
        while self.in_flight:
            self._idle.clear()
            if self.in_flight:  # a task finishing before the clear has already set it
                await self._idle.wait()


class FrontSpin:
    """Keeps the front's event loop spinning while no worker thread runs (see the module's
    docstring). In the loop: `install` before anything runs in the loop's default executor,
    `start` to spin, `stop` before the loop closes."""

    def __init__(self) -> None:
        self.pool: CountingThreadPool | None = None
        self.turns = 0  # times the spinning task yielded to the loop
        self._task: asyncio.Task | None = None

    def install(self) -> None:
        """Makes a CountingThreadPool the loop's default executor (asyncio.to_thread's)."""
        loop = asyncio.get_running_loop()
        self.pool = CountingThreadPool(loop, thread_name_prefix="ocula-front")
        loop.set_default_executor(self.pool)

    def start(self) -> None:
        if self.pool is None:
            self.install()
        self._task = asyncio.get_running_loop().create_task(self._spin())

    async def _spin(self) -> None:
        assert self.pool is not None
        while True:
            await self.pool.wait_idle()
            self.turns += 1
            await asyncio.sleep(0)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
