"""`--idle_wait`: the engine process and the front's event loop spin (poll without sleeping)
while idle, or sleep; the front's spinning pauses while its worker threads run."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import psutil
import pytest

from ocula.server.idle_wait import FrontSpin, receive_spinning, spins_when_idle
from tests.helpers.server import assert_all_gone, start_server


@pytest.mark.parametrize(
    ("idle_wait", "device", "spins"),
    [
        ("auto", "cuda", True),
        ("auto", "cpu", False),
        ("spin", "cpu", True),
        ("sleep", "cuda", False),
    ],
)
def test_auto_spins_on_a_gpu_only(idle_wait, device, spins) -> None:
    assert spins_when_idle(idle_wait, device) is spins


def test_an_unknown_setting_is_refused() -> None:
    with pytest.raises(ValueError, match="--idle_wait must be one of"):
        spins_when_idle("nap", "cuda")


def test_receive_spinning_polls_without_a_timeout_until_messages_come() -> None:
    answers = [[], [], [], ["message"]]
    timeouts = []

    def receive(timeout_ms: int) -> list[str]:
        timeouts.append(timeout_ms)
        return answers.pop(0)

    assert receive_spinning(receive, 60.0) == ["message"]
    assert timeouts == [0, 0, 0, 0]
    # Nothing comes: it returns [] once its time is up (the engine loop then checks its parent).
    assert receive_spinning(lambda _: [], 0.01) == []


def test_the_front_spins_except_while_a_worker_thread_runs() -> None:
    async def scenario() -> None:
        spin = FrontSpin()
        spin.install()
        spin.start()
        await asyncio.sleep(0.01)
        assert spin.turns > 0  # the loop never blocked: the task kept yielding to it
        release = threading.Event()
        work = asyncio.ensure_future(asyncio.to_thread(release.wait, 30))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert spin.pool is not None and spin.pool.in_flight == 1
        paused_at = spin.turns
        await asyncio.sleep(0.05)  # the loop sleeps in its poll: the thread has the GIL to itself
        assert spin.turns == paused_at
        release.set()
        assert await work is True
        while spin.turns == paused_at:  # spinning again once the thread is done
            await asyncio.sleep(0)
        assert spin.pool.in_flight == 0
        await spin.stop()
        leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert leftover == []

    asyncio.run(scenario())


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def test_a_spinning_server_serves_and_stops_cleanly(tiny_checkpoint, tmp_path) -> None:
    running = start_server(
        tiny_checkpoint("llama"), tmp_path, "--max_total_token_num", "256", "--idle_wait", "spin"
    )
    try:
        assert "while idle, the engine process and the front spin" in running.log()
        body = {"inputs": "the quick brown fox", "parameters": {"max_new_tokens": 3}}
        answer = httpx.post(running.url + "/generate", json=body, timeout=60)
        assert answer.status_code == 200 and answer.json()["count_output_tokens"] == 3
        front = psutil.Process(running.process.pid)
        children = front.children(recursive=True)
        engine = max(children, key=_cpu_seconds)  # the engine (the others: resource tracker)
        before = (_cpu_seconds(front), _cpu_seconds(engine))
        time.sleep(1.0)
        used = (_cpu_seconds(front) - before[0], _cpu_seconds(engine) - before[1])
        # Idle, both processes stayed on the CPU (a sleeping one uses ~0.01 s in a second).
        assert min(used) > 0.2, used
    finally:
        code = running.stop(timeout=20)
    assert code == 0, running.log()
    assert_all_gone(children, timeout=5)
