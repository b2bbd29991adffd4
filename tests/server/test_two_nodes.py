"""`--nnodes 2` on one machine: node 0 (the HTTP server with rank 0) and node 1 (a worker node
with rank 1) started as two separate commands meet at --nccl_host:--nccl_port, and serve exactly
tp=1's greedy tokens; stopping node 0 stops node 1 (exit 0), and a dead rank on node 1 takes node
0 down with an error instead of a hang."""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.helpers.server import assert_all_gone, free_port, start_server
from tests.server.test_tensor_parallel import (
    EXIT_SECONDS,
    PROMPTS,
    offline_greedy_ids,
    server_greedy_ids,
)

LIMITS = ("--max_total_token_num", "1024", "--max_req_total_len", "256")


def start_worker_node(
    checkpoint: Path, log_dir: Path, nccl_port: int, *extra: str
) -> subprocess.Popen:
    log = (log_dir / "node1.log").open("w")
    command = [
        sys.executable,
        "-m",
        "ocula.server.api_server",
        "--model_dir",
        str(checkpoint),
        *("--tp", "2", "--nnodes", "2", "--node_rank", "1", "--nccl_port", str(nccl_port)),
        *LIMITS,
        *extra,
    ]
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def node_flags(nccl_port: int) -> tuple[str, ...]:
    return ("--tp", "2", "--nnodes", "2", "--node_rank", "0", "--nccl_port", str(nccl_port))


@pytest.mark.slow
def test_two_nodes_serve_tp1_tokens_and_stop_together(tiny_checkpoint, tmp_path) -> None:
    checkpoint = tiny_checkpoint("llama")
    expected = offline_greedy_ids(checkpoint, PROMPTS)
    nccl_port = free_port()
    node1 = start_worker_node(checkpoint, tmp_path, nccl_port)  # before node 0: it waits
    try:
        server = start_server(checkpoint, tmp_path, *node_flags(nccl_port), *LIMITS)
    except BaseException:
        node1.kill()
        raise
    node1_ranks = psutil.Process(node1.pid).children(recursive=True)
    assert [server_greedy_ids(server, prompt) for prompt in PROMPTS] == expected
    assert server.stop(timeout=30) == 0, server.log()
    assert node1.wait(EXIT_SECONDS) == 0, (tmp_path / "node1.log").read_text()
    assert_all_gone(node1_ranks, EXIT_SECONDS)


@pytest.mark.slow
def test_a_dead_rank_on_node_1_takes_node_0_down(tiny_checkpoint, tmp_path) -> None:
    checkpoint = tiny_checkpoint("llama")
    nccl_port = free_port()
    node1 = start_worker_node(checkpoint, tmp_path, nccl_port)
    try:
        server = start_server(checkpoint, tmp_path, *node_flags(nccl_port), *LIMITS)
    except BaseException:
        node1.kill()
        raise
    node0_processes = psutil.Process(server.process.pid).children(recursive=True)
    rank_process(tmp_path / "node1.log").send_signal(signal.SIGKILL)
    try:
        assert node1.wait(EXIT_SECONDS) == 1
        server_greedy_ids_or_error(server)
        code = server.process.wait(EXIT_SECONDS)
    finally:
        server.stop()
        node1.kill()
    assert code != 0, server.log()
    assert "engine failed" in server.log()
    assert_all_gone(node0_processes, EXIT_SECONDS)


@pytest.mark.slow
def test_a_node_started_with_other_flags_is_refused_instead_of_hanging(
    tiny_checkpoint, tmp_path
) -> None:
    checkpoint = tiny_checkpoint("llama")
    nccl_port = free_port()
    node1 = start_worker_node(checkpoint, tmp_path, nccl_port, "--disable_overlap_schedule")
    try:
        with pytest.raises(AssertionError, match="exited with 1") as refused:
            start_server(checkpoint, tmp_path, *node_flags(nccl_port), *LIMITS)
        assert node1.wait(EXIT_SECONDS) == 1
    finally:
        node1.kill()
    assert "other engine flags than node 0" in str(refused.value)
    node1_log = (tmp_path / "node1.log").read_text()
    assert "--disable_overlap_schedule True here, False on node 0" in node1_log, node1_log


def rank_process(log: Path) -> psutil.Process:
    """Rank 1's process, from the pid node 1 logs when it starts it."""
    deadline = time.monotonic() + EXIT_SECONDS
    while time.monotonic() < deadline:
        match = re.search(r"tensor-parallel rank 1 started \(pid (\d+)\)", log.read_text())
        if match:
            return psutil.Process(int(match[1]))
        time.sleep(0.1)
    raise AssertionError(log.read_text())


def server_greedy_ids_or_error(server) -> None:
    """A request after the rank died: the next step's collective fails on rank 0, which reports
    the failure (the request itself may get an error or the connection may drop)."""
    with contextlib.suppress(httpx.TransportError):
        httpx.post(
            server.url + "/generate",
            json={"inputs": "hello", "parameters": {"max_new_tokens": 4}},
            timeout=EXIT_SECONDS,
        )
