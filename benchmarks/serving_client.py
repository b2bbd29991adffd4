"""The HTTP side of the serving benchmark: the server as a child process, and a streaming client.

The server is `python -m ocula.server.api_server` on a free port, in its own process group (so
that a hung server and its engine process can be stopped together). Requests go to LightLLM's
`/generate_stream` through `http_stream.StreamingClient`; the client notes the time each token
event arrives.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.common import REPO_ROOT, log
from benchmarks.http_stream import HttpProtocolError, StreamingClient


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    def __init__(
        self,
        model_dir: Path,
        flags: list[str],
        log_path: Path,
        module: str = "ocula.server.api_server",
        env: dict[str, str] | None = None,
        cwd: Path = REPO_ROOT,
    ) -> None:
        """`module`: what `python -m` runs (the server, or a wrapper of it); `env`: variables
        added to this process's environment; `cwd`: its folder, first on its import path."""
        self.port = free_port()
        self.log_path = log_path
        self.command = [sys.executable, "-m", module]
        self.command += ["--model_dir", str(model_dir), "--port", str(self.port), *flags]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("w")
        self.process = subprocess.Popen(
            self.command,
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_healthy(self, timeout: float, poll_seconds: float = 0.5) -> float:
        """Seconds until /health answered 200, asking every `poll_seconds`; raises if the
        server exits or times out."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}: {self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.monotonic() - start
            except httpx.TransportError:
                pass
            time.sleep(poll_seconds)
        raise TimeoutError(f"server not healthy after {timeout:.0f} s: {self.tail()}")

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 20) -> int | None:
        """SIGTERM and wait; SIGKILL to its process group if it does not exit. Returns the exit
        code of a clean stop, None when it had to be killed."""
        code: int | None = None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                code = self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log("server ignored SIGTERM: killing its process group")
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        else:
            code = self.process.returncode
        self._log.close()
        return code


@dataclass
class StreamResult:
    sent_at: float
    token_times: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.token_times)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.sent_at

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (None for a single token)."""
        if len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)


def generate_body(inputs: str, images: list[str], new_tokens: int) -> bytes:
    """A `/generate_stream` body: greedy, ignore_eos; `images` are base64 strings."""
    body = {
        "inputs": inputs,
        "parameters": {"max_new_tokens": new_tokens, "ignore_eos": True, "do_sample": False},
        "multimodal_params": {"images": [{"type": "base64", "data": i} for i in images]},
    }
    return json.dumps(body).encode()


async def stream(client: StreamingClient, body: bytes) -> StreamResult:
    """POSTs `body` to /generate_stream and records when each token event arrives."""
    result = StreamResult(time.perf_counter())
    try:
        response = await client.post("/generate_stream", body)
    except (OSError, ValueError, asyncio.IncompleteReadError, HttpProtocolError) as error:
        result.error = f"{type(error).__name__}: {error}"
        return result
    try:
        if response.status != 200:
            text = (await response.read()).decode(errors="replace")
            result.error = f"HTTP {response.status}: {text[:200]}"
            return result
        async for payload in response.sse_data():
            event = json.loads(payload)
            if event.get("token"):
                result.token_times.append(time.perf_counter())
            if "error" in event:
                result.error = f"stream error: {event['error']}"
    except (OSError, ValueError, asyncio.IncompleteReadError, HttpProtocolError) as error:
        result.error = f"{type(error).__name__}: {error}"
    finally:  # a response not read to its end (an error, a cancellation) closes its connection
        client.release(response)
    return result
