"""The HTTP front's event loop: uvloop when it is installed, asyncio's own loop otherwise."""

from __future__ import annotations

import asyncio
import sys

import pytest

from ocula.server.api_server import run_event_loop


async def _on_uvloop() -> int:
    """1 when the running loop is uvloop's, 0 otherwise (the exit code stands in for serve's)."""
    return int(type(asyncio.get_running_loop()).__module__.startswith("uvloop"))


def test_the_front_runs_on_uvloop_when_it_is_installed() -> None:
    pytest.importorskip("uvloop")
    assert run_event_loop(_on_uvloop()) == 1


def test_the_front_falls_back_to_asyncio_without_uvloop(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` raises ImportError
    assert run_event_loop(_on_uvloop()) == 0
