"""Starting the real server as a subprocess on a free port, for tests that talk HTTP to it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

STARTUP_TIMEOUT_SECONDS = 180


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    process: subprocess.Popen
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then wait; returns the exit code (kills and fails loudly if it hangs)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(
                    f"server ignored SIGTERM for {timeout} s\n{self.log()}"
                ) from None
        return self.process.returncode


def start_server(
    model_dir: Path,
    log_dir: Path,
    *flags: str,
    env: dict[str, str] | None = None,
    new_session: bool = False,
) -> RunningServer:
    """Starts `python -m ocula.server.api_server` and waits until /health answers 200.
    `env` adds environment variables for the server process; with `new_session` the server
    and its children form their own process group (its id: the server's pid)."""
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    log = log_path.open("w")
    command = [
        sys.executable,
        "-m",
        "ocula.server.api_server",
        "--model_dir",
        str(model_dir),
        "--port",
        str(port),
        *flags,
    ]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    process = subprocess.Popen(
        command,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=full_env,
        start_new_session=new_session,
    )
    server = RunningServer(process, port, log_path)
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    server.stop()
    raise AssertionError(f"server not healthy after {STARTUP_TIMEOUT_SECONDS} s\n{server.log()}")


def assert_all_gone(processes: list[psutil.Process], timeout: float = 20) -> None:
    """Every process has exited within `timeout` (multiprocessing's resource tracker, for one,
    leaves a moment after its parent)."""
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive
