"""The channel between the front and the engine process: pickled messages over one Unix socket.

Each message is one frame (`channel_frames.py`): a header, the pickle, then the raw bytes of its
large arrays (image tiles), which are never copied into the pickle. The front listens on
a socket in a private temporary folder before it spawns the engine process, which connects to it
first thing; one connection carries both directions. The folder is removed as soon as the engine
has connected, so a front killed later (SIGKILL included) leaves nothing behind in /tmp.

A plain stream socket rather than ZMQ: a message then wakes only the process that reads it,
where ZMQ's PUSH/PULL pass it through an I/O thread on each side; a request's first token crosses
two such hops (BENCHMARKS.md has the measurements).

- The engine side (`EngineSideChannel`) is synchronous: it waits for messages with a timeout,
  reads whatever has arrived without blocking, and never blocks on a send (what the socket
  cannot take yet is queued and written in order later, as ZMQ's queue did).
- The front side (`FrontSideChannel`) is an asyncio protocol: frames are decoded and handed to a
  callback as they arrive on the event loop, and `send` never blocks (the event loop's transport
  buffers what the socket cannot take yet).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import select
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from ocula.server.channel_frames import FrameDecoder, decode, encode
from ocula.server.channel_listener import ChannelListener

logger = logging.getLogger(__name__)

# The engine side reads up to this much per system call into one buffer it keeps.
READ_CHUNK_BYTES = 1 << 20
# Buffers per write call, well under the system's IOV_MAX (1024 on Linux).
MAX_PIECES_PER_WRITE = 64
# Room in the kernel for what one side writes while the other is busy elsewhere (the engine's
# outputs; the front's requests and their image tiles).
SEND_BUFFER_BYTES = 4 << 20
# The engine side reads a frame it has begun to its end before it returns, waiting up to this
# long in all for the rest. The kernel holds about 200-400 KB of a Unix socket's bytes in
# flight (net.core.wmem_max caps the buffer), so the front writes a larger frame (a request's
# new image tiles: 602 KB each) in pieces, each once the engine has read the last; read once
# per engine step, a tile's request arrived two or three steps late (+15 ms TTFT on an H100).
PARTIAL_FRAME_WAIT_MS = 20


class ChannelClosedError(ConnectionError):
    """The other side closed the channel (its process exited or is exiting)."""


class EngineSideChannel:
    """The engine process's end: connects to the front's socket at `path`.

    Sending never blocks the engine loop: what the socket cannot take yet (the front's event
    loop busy elsewhere, its buffer full) waits in `_unsent` and goes out on later calls of
    `send` and `receive`, in order."""

    def __init__(self, path: str | Path) -> None:
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        self._socket.connect(str(path))
        self._poller = select.poll()
        self._poller.register(self._socket, select.POLLIN)
        self._chunk = bytearray(READ_CHUNK_BYTES)
        self._view = memoryview(self._chunk)
        self._decoder = FrameDecoder()
        self._unsent: collections.deque[memoryview] = collections.deque()
        self.closed = False  # the front closed its end: nothing more will arrive
        self._wakeups: set[int] = set()

    def add_wakeup(self, fd: int) -> None:
        """Makes `receive` return early when the non-blocking pipe `fd` becomes readable; it
        reads the pipe empty."""
        self._poller.register(fd, select.POLLIN)
        self._wakeups.add(fd)

    @property
    def unsent_bytes(self) -> int:
        return sum(len(piece) for piece in self._unsent)

    def send(self, message: object) -> None:
        """Queues one message and writes what the socket takes now. Its large arrays are queued
        as views, not copies: they must not change afterwards. Raises ChannelClosedError when
        the front is gone."""
        self._unsent.extend(memoryview(piece).cast("B") for piece in encode(message))
        self._flush()

    def _flush(self) -> None:
        while self._unsent:
            try:
                pieces = list(itertools.islice(self._unsent, MAX_PIECES_PER_WRITE))
                sent = self._socket.sendmsg(pieces, [], socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except (BrokenPipeError, ConnectionResetError) as error:
                self.closed = True
                raise ChannelClosedError("the front closed the channel") from error
            while sent and sent >= len(self._unsent[0]):
                sent -= len(self._unsent.popleft())
            if sent:
                self._unsent[0] = self._unsent[0][sent:]
                return  # a partial write: the socket is full

    def receive(self, timeout_ms: int) -> list[Any]:
        """Every message that has arrived, waiting up to `timeout_ms` for the first one ([] when
        none came), and for the rest of a message begun (`PARTIAL_FRAME_WAIT_MS`); unsent
        messages go out meanwhile. Sets `closed` when the front has closed its end."""
        if self.closed:
            return []
        self._flush()
        events = select.POLLIN | (select.POLLOUT if self._unsent else 0)
        self._poller.modify(self._socket, events)
        ready = self._poller.poll(timeout_ms)
        if self._unsent:
            self._flush()
        for fd, _ in ready:
            if fd in self._wakeups:
                _drain_pipe(fd)
        socket_fd = self._socket.fileno()
        readable = select.POLLIN | select.POLLHUP | select.POLLERR
        if not any(fd == socket_fd and event & readable for fd, event in ready):
            return []
        frames: list[tuple[bytearray, list[bytearray]]] = []
        rest_deadline = time.monotonic() + PARTIAL_FRAME_WAIT_MS / 1000
        while True:
            try:
                count = self._socket.recv_into(self._view, READ_CHUNK_BYTES, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if self._decoder.mid_frame and self._wait_for_more(rest_deadline):
                    continue
                break
            except ConnectionResetError:
                count = 0
            if count == 0:
                self.closed = True
                break
            frames += self._decoder.feed(self._view[:count])
            if count < READ_CHUNK_BYTES and not self._decoder.mid_frame:
                break  # drained: save the system call that would say so
        return [decode(*frame) for frame in frames]

    def _wait_for_more(self, deadline: float) -> bool:
        """Whether bytes arrived before `deadline` (the socket alone: a wake-up pipe must not
        end this wait)."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        return bool(select.select([self._socket], [], [], remaining)[0])

    def close(self, flush_seconds: float = 2.0) -> None:
        """Closes the socket after trying for up to `flush_seconds` to write what is unsent."""
        deadline = time.monotonic() + flush_seconds
        try:
            while self._unsent and time.monotonic() < deadline:
                self._flush()
                if self._unsent:
                    select.select([], [self._socket], [], max(0.0, deadline - time.monotonic()))
        except ChannelClosedError:
            pass
        self._socket.close()


class FrontSideChannel(asyncio.Protocol):
    """The front's end: listens in a private folder for the engine process's one connection,
    then hands every message to `on_message` on the event loop and calls `on_close` once if the
    engine's end closes (not after `close`)."""

    def __init__(self, on_message: Callable[[Any], None], on_close: Callable[[], None]) -> None:
        self._on_message = on_message
        self._on_close = on_close
        self._decoder = FrameDecoder()
        self._server: asyncio.AbstractServer | None = None
        self._transport: asyncio.Transport | None = None
        self._backlog: list[list[bytes | memoryview]] = []  # sent before the engine connected
        self._closing = False
        self._accepted = False
        self._folder: Path | None = None  # holds the listening socket until the engine connects

    async def listen(self, listener: ChannelListener | None = None) -> Path:
        """Accepts the engine's connection on `listener` (made here when None, which this
        channel then owns either way); returns the socket's path, for the engine process to
        connect to."""
        if listener is None:
            listener = ChannelListener()
        self._folder = listener.folder
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_unix_server(self._accept, sock=listener.socket)
        except BaseException:
            listener.close()
            self._folder = None
            raise
        return listener.path

    def _remove_folder(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def _accept(self) -> asyncio.Protocol:
        # Decided here, not in connection_made: the loop may accept a second connection, and
        # ask for its protocol, before the first one's connection_made runs.
        if self._accepted or self._closing:
            return _Refused()  # one engine connection; nothing else may talk to the engine
        self._accepted = True
        return self

    @property
    def connected(self) -> bool:
        return self._transport is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._closing:  # closed between the accept and now
            transport.close()
            return
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        # Room for a request's image tiles in the kernel: with the default (~200 KB) a frame of
        # 13 tiles (7.8 MB) crossed in 14 ms on the 2-core CPU machine, 2.4 ms with this.
        connection = transport.get_extra_info("socket")
        if connection is not None:
            with contextlib.suppress(OSError):  # the system caps it (net.core.wmem_max)
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        if self._server is not None:
            self._server.close()  # stop listening: the engine is the only peer
        self._remove_folder()  # nothing else connects: the path can go
        for frame in self._backlog:
            self._transport.writelines(frame)
        self._backlog.clear()

    def data_received(self, data: bytes) -> None:
        for frame in self._decoder.feed(data):
            self._on_message(decode(*frame))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._closing:
            self._on_close()

    def send(self, message: object) -> None:
        """Queues one message for the engine; never blocks. Its large arrays are queued as
        views, not copies: they must not change afterwards."""
        frame = encode(message)
        if self._transport is None:
            self._backlog.append(frame)
        elif not self._transport.is_closing():
            self._transport.writelines(frame)

    def close(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.close()
        if self._server is not None:
            self._server.close()
        self._remove_folder()


class _Refused(asyncio.Protocol):
    """A second connection to the front's socket: closed at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        logger.warning("refused a second connection to the engine channel's socket")
        transport.close()


def _drain_pipe(fd: int) -> None:
    """Reads everything a non-blocking pipe holds."""
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 4096):
            pass
