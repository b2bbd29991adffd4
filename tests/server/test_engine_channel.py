"""The channel between the front and the engine process: frames, order, large messages, closing."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ocula.server import engine_channel
from ocula.server.channel_frames import FrameDecoder, decode, encode
from ocula.server.engine_channel import (
    READ_CHUNK_BYTES,
    ChannelClosedError,
    EngineSideChannel,
    FrontSideChannel,
)


def _loop_factories() -> list[Any]:
    factories = [pytest.param(asyncio.new_event_loop, id="asyncio")]
    try:
        import uvloop
    except ImportError:
        return factories
    return [*factories, pytest.param(uvloop.new_event_loop, id="uvloop")]


LOOPS = _loop_factories()


def run(loop_factory: Callable[[], asyncio.AbstractEventLoop], coro: Coroutine) -> Any:
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(asyncio.wait_for(coro, timeout=30))


class Inbox:
    """What the front side received, with a way to wait for it."""

    def __init__(self) -> None:
        self.messages: list[Any] = []
        self.closed = 0
        self._changed = asyncio.Event()

    def on_message(self, message: Any) -> None:
        self.messages.append(message)
        self._changed.set()

    def on_close(self) -> None:
        self.closed += 1
        self._changed.set()

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        while not condition():
            self._changed.clear()
            await self._changed.wait()


async def connected() -> tuple[Inbox, FrontSideChannel, EngineSideChannel]:
    """A listening front and an engine side connected to it."""
    inbox = Inbox()
    front = FrontSideChannel(inbox.on_message, inbox.on_close)
    path = await front.listen()
    engine = await asyncio.to_thread(EngineSideChannel, path)
    return inbox, front, engine


def receive_all(channel: EngineSideChannel, count: int) -> list[Any]:
    """The engine side's loop: receive until `count` messages came or the channel closed."""
    received: list[Any] = []
    while len(received) < count and not channel.closed:
        received += channel.receive(100)
    return received


def same_messages(received: list[dict], sent: list[dict]) -> bool:
    def plain(message: dict) -> dict:
        return {key: value for key, value in message.items() if key != "tiles"}

    return [plain(m) for m in received] == [plain(m) for m in sent] and all(
        (a["tiles"] is None and b["tiles"] is None) or torch.equal(a["tiles"], b["tiles"])
        for a, b in zip(received, sent, strict=True)
    )


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_messages_cross_both_ways_in_order_large_ones_included(loop_factory: Any) -> None:
    big = os.urandom(3 * READ_CHUNK_BYTES + 17)  # more than the engine reads per call
    tiles = torch.randint(0, 256, (2, 3, 448, 448), dtype=torch.uint8)  # out of band
    sent = [
        {
            "index": i,
            "data": big if i % 3 == 0 else b"small",
            "tiles": tiles if i % 4 == 1 else None,
        }
        for i in range(12)
    ]

    async def scenario() -> None:
        inbox = Inbox()
        front = FrontSideChannel(inbox.on_message, inbox.on_close)
        path = await front.listen()
        front.send(sent[0])  # before the engine connects: kept until it does
        engine = await asyncio.to_thread(EngineSideChannel, path)
        for message in sent[1:]:
            front.send(message)
        received = await asyncio.to_thread(receive_all, engine, len(sent))
        assert same_messages(received, sent)
        for message in received:  # and back, in order
            await asyncio.to_thread(engine.send, message)
        await inbox.wait_for(lambda: len(inbox.messages) == len(sent))
        assert same_messages(inbox.messages, sent)
        front.close()
        engine.close()

    run(loop_factory, scenario())


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_each_side_sees_the_other_close(loop_factory: Any) -> None:
    async def scenario() -> None:
        inbox, front, engine = await connected()
        engine.close()  # the engine exits: the front is told once
        await inbox.wait_for(lambda: inbox.closed > 0)
        assert inbox.closed == 1

        inbox, front, engine = await connected()
        front.send("last words")
        await asyncio.sleep(0.05)
        front.close()  # the front goes: the engine reads what was sent, then sees it closed
        assert await asyncio.to_thread(receive_all, engine, 2) == ["last words"]
        assert engine.closed
        with pytest.raises(ChannelClosedError):
            for _ in range(100):  # the first writes may still fit the socket's buffer
                engine.send("anyone there?")
        await asyncio.sleep(0.05)
        assert inbox.closed == 0  # the front's own close is not reported to it
        engine.close()

    run(loop_factory, scenario())


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_only_one_engine_may_connect(loop_factory: Any) -> None:
    async def scenario() -> None:
        inbox = Inbox()
        front = FrontSideChannel(inbox.on_message, inbox.on_close)
        path = await front.listen()
        assert path.parent.stat().st_mode & 0o777 == 0o700  # only this user can reach it
        # Both connect before the loop accepts either: the second one is accepted in the same
        # round, before the first one's connection_made, and must still be turned away.
        engine = EngineSideChannel(path)
        racer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            racer.connect(str(path))
            racer.settimeout(5)
            # Closed at once (or reset, had listening stopped with it still queued).
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.to_thread(racer.recv, 1) == b""
        finally:
            racer.close()
        # Once the engine is in, the socket and its folder are gone: nothing else can connect,
        # and a front killed from here on leaves nothing in /tmp.
        assert not path.parent.exists()
        front.send("still here")
        assert await asyncio.to_thread(receive_all, engine, 1) == ["still here"]
        engine.send("and here")
        await inbox.wait_for(lambda: bool(inbox.messages))
        assert inbox.messages == ["and here"]
        front.close()
        engine.close()

    run(loop_factory, scenario())


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_a_front_closed_before_the_engine_connects_removes_its_folder(loop_factory: Any) -> None:
    async def scenario() -> None:
        front = FrontSideChannel(lambda message: None, lambda: None)
        path = await front.listen()
        assert path.exists()
        front.close()
        assert not path.parent.exists()

    run(loop_factory, scenario())


@pytest.fixture
def engine_and_peer(tmp_path: Path) -> Iterator[tuple[EngineSideChannel, socket.socket]]:
    """An engine side connected to a plain socket that plays the front."""
    path = tmp_path / "engine.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    engine = EngineSideChannel(path)
    peer, _ = listener.accept()
    yield engine, peer
    engine.close()
    peer.close()
    listener.close()


def test_the_engine_side_returns_nothing_when_nothing_arrives(engine_and_peer) -> None:
    engine, peer = engine_and_peer
    assert engine.receive(0) == []
    assert engine.receive(20) == []
    header, data = encode({"hello": 1})
    # A frame written in two pieces, the second after the engine has looked once.
    peer.sendall(header + data[:3])
    assert engine.receive(100) == []
    timer = threading.Timer(0.05, peer.sendall, args=(data[3:],))
    timer.start()
    received = receive_all(engine, 1)
    timer.join()
    assert received == [{"hello": 1}]
    assert not engine.closed


def test_the_engine_never_blocks_on_a_front_that_does_not_read(engine_and_peer) -> None:
    engine, peer = engine_and_peer
    sent = [os.urandom(100_000) for _ in range(200)]  # 20 MB: far more than the socket holds
    for message in sent:
        engine.send(message)  # returns at once; the rest waits in the channel
    assert engine.unsent_bytes > 0
    received: list[bytes] = []

    def read() -> None:
        decoder = FrameDecoder()
        while len(received) < len(sent):
            received.extend(decoder.feed(peer.recv(1 << 20)))

    reader = threading.Thread(target=read)
    reader.start()
    while engine.unsent_bytes:  # the engine loop's receive calls write the rest
        engine.receive(10)
    reader.join(timeout=30)
    assert [decode(*frame) for frame in received] == sent


def test_a_wakeup_pipe_ends_the_wait_early_and_is_read_empty(engine_and_peer) -> None:
    from ocula.engine.tiling_signal import TilingSignal

    engine, peer = engine_and_peer
    signal = TilingSignal()
    engine.add_wakeup(signal.fileno())
    try:
        timer = threading.Timer(0.05, signal.notify)
        timer.start()
        started = time.monotonic()
        assert engine.receive(10_000) == []  # the signal, not the 10 s timeout, ends it
        timer.join()
        assert time.monotonic() - started < 5
        for _ in range(3):
            signal.notify()
        assert engine.receive(0) == []
        assert select.select([signal.fileno()], [], [], 0)[0] == []  # drained
        # A message and a wake-up together: the message comes through.
        signal.notify()
        peer.sendall(b"".join(encode({"after": 1})))
        assert receive_all(engine, 1) == [{"after": 1}]
    finally:
        signal.close()


def test_a_frame_larger_than_the_socket_holds_comes_in_one_receive(
    engine_and_peer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The front writes it in pieces of the socket's buffer, each once the engine has read the
    # last: an engine reading only what is there would need a call (an engine step) per piece.
    monkeypatch.setattr(engine_channel, "PARTIAL_FRAME_WAIT_MS", 10_000)  # a slow CI machine
    engine, peer = engine_and_peer
    message = os.urandom(3 << 20)
    writer = threading.Thread(target=peer.sendall, args=(b"".join(encode(message)),))
    writer.start()
    assert engine.receive(10_000) == [message]
    writer.join(timeout=30)
    # A front that stops inside a frame holds the engine up only so long.
    monkeypatch.setattr(engine_channel, "PARTIAL_FRAME_WAIT_MS", 50)
    header, data = encode(message)
    peer.sendall(header + data[:1000])
    started = time.monotonic()
    assert engine.receive(0) == []
    assert 0.04 < time.monotonic() - started < 5
    writer = threading.Thread(target=peer.sendall, args=(data[1000:],))
    writer.start()
    assert receive_all(engine, 1) == [message]
    writer.join(timeout=30)
