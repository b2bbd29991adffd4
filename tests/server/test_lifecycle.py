"""Start-up, health, shutdown and refusal of bad flags, on the real server process."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.helpers.server import assert_all_gone, free_port, start_server


def test_health_probes_and_unknown_routes(server) -> None:
    for path in ("/health", "/healthz", "/readiness", "/liveness"):
        assert httpx.get(server.url + path).status_code == 200
    assert httpx.head(server.url + "/healthz").status_code == 200
    missing = httpx.get(server.url + "/no/such/route")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == 404
    assert httpx.get(server.url + "/get_model_name").json()["model_name"]
    # LightLLM answers these on POST too.
    for path in ("/readiness", "/liveness", "/get_model_name"):
        assert httpx.post(server.url + path).status_code == 200


def test_the_server_sleeps_while_idle_by_default(server) -> None:
    # --idle_wait spin is opt-in (tests/server/test_idle_wait.py).
    assert "while idle, the engine process and the front sleep (--idle_wait sleep)" in server.log()


def test_lightllm_compat_routes(server) -> None:
    body = {"inputs": "the quick brown fox", "parameters": {"max_new_tokens": 3}}
    whole = httpx.post(server.url + "/", json={**body, "stream": False}, timeout=60)
    assert whole.status_code == 200 and whole.json()["count_output_tokens"] == 3
    streamed = httpx.post(server.url + "/", json={**body, "stream": True}, timeout=60)
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert streamed.text.count("data:") == 3
    # /tokens by GET with a JSON body, as LightLLM takes it.
    counted = httpx.request("GET", server.url + "/tokens", json={"text": "the quick brown fox"})
    assert counted.status_code == 200 and counted.json()["ntokens"] > 0
    long = {"inputs": "fox", "parameters": {"max_new_tokens": 100, "ignore_eos": True}}
    with httpx.stream("POST", server.url + "/generate_stream", json=long, timeout=60) as held:
        lines = held.iter_lines()  # kept: a dropped iterator would close the stream
        assert next(lines).startswith("data:")
        load = httpx.get(server.url + "/token_load").json()
        assert set(load) == {"current_load", "logical_max_load", "dynamic_max_load"}
        assert 0 < load["current_load"] < load["dynamic_max_load"] <= 1, load
    # The client left: the request is aborted and the load falls back to nothing.
    deadline = time.monotonic() + 10
    while httpx.get(server.url + "/token_load").json()["dynamic_max_load"] > 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_sigterm_stops_every_process_and_frees_the_port(tiny_checkpoint, tmp_path) -> None:
    running = start_server(tiny_checkpoint("llama"), tmp_path, "--max_total_token_num", "256")
    children = psutil.Process(running.process.pid).children(recursive=True)
    assert children, "the engine runs in a child process"
    assert running.stop(timeout=20) == 0
    assert_all_gone(children, timeout=5)
    # The same port is free again at once.
    again = start_server(tiny_checkpoint("llama"), tmp_path, "--max_total_token_num", "256")
    again.stop()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
        (["--port", "eighty"], "--port: invalid int value"),
        (["--mem_fraction", "1.5"], "--mem_fraction must be in (0, 1]"),
        (["--image_cache_gb", "0"], "--image_cache_gb must be above 0"),
        (["--visual_dp", "2"], "--visual_dp (2) x --visual_tp"),
        (["--data_type", "int3"], "--data_type: invalid choice"),
        # No abbreviations: a LightLLM flag Ocula lacks is named, not taken for another.
        (["--mode", "triton_gqa_flashdecoding"], "unrecognized arguments: --mode"),
        (["--trust"], "unrecognized arguments: --trust"),
        # LightLLM's flags that would change outputs are not taken as no-ops.
        (["--tool_call_parser", "qwen25"], "unrecognized arguments: --tool_call_parser"),
        (["--use_tgi_api"], "unrecognized arguments: --use_tgi_api"),
        (["--hardware_platform", "musa"], "--hardware_platform: invalid choice"),
        (["--dp", "2"], "--dp 2 is not supported"),
        (["--quant_type", "w8a8"], "--quant_type: invalid choice"),
        (["--run_mode", "prefill"], "--run_mode: invalid choice"),
        (["--llm_kv_type", "int8kv"], "--llm_kv_type: invalid choice"),
        (["--output_constraint_mode", "xgrammar"], "--output_constraint_mode: invalid choice"),
        (["--chat_template", "/no/such.jinja"], "--chat_template: cannot read"),
    ],
)
def test_bad_flags_are_refused_with_a_message_naming_them(flags, message) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ocula.server.api_server", *flags],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert message in result.stderr


def test_ocula_serve_is_the_same_command() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "from ocula.cli import main; main()", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    assert "--visual_infer_batch_size" in result.stdout and "--cache_capacity" in result.stdout


def test_a_dead_engine_takes_the_server_down(tiny_checkpoint, tmp_path) -> None:
    running = start_server(tiny_checkpoint("llama"), tmp_path, "--max_total_token_num", "256")
    children = psutil.Process(running.process.pid).children(recursive=True)
    [engine] = [c for c in children if "resource_tracker" not in " ".join(c.cmdline())]
    engine.kill()
    try:
        code = running.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        running.stop()
        raise AssertionError(
            f"the server kept running without its engine\n{running.log()}"
        ) from None
    assert code == 1
    assert "engine process exited with code -9" in running.log()


def test_a_folder_that_is_no_model_stops_the_engine_started_beside_the_front(tmp_path) -> None:
    """The engine process starts right after the port is bound, while the front imports; when
    the front then finds no model in the folder, it exits 1 naming why, and stops that process
    and removes the channel's socket folder before it goes."""
    channels_before = set(Path(tempfile.gettempdir()).glob("ocula-*"))
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    command = [sys.executable, "-m", "ocula.server.api_server", "--model_dir", str(empty)]
    front = subprocess.Popen(
        [*command, "--port", str(free_port())],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: dict[int, psutil.Process] = {}
    deadline = time.monotonic() + 60
    while front.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(front.pid).children(recursive=True):
                seen.setdefault(child.pid, child)
        time.sleep(0.02)
    if front.poll() is None:
        front.kill()
    output = front.communicate(timeout=10)[0]
    assert front.returncode == 1, output
    assert "has no config.json: it is not a model folder" in output
    assert seen, "no engine process was started beside the front"
    assert_all_gone(list(seen.values()), timeout=5)
    assert set(Path(tempfile.gettempdir()).glob("ocula-*")) <= channels_before


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_starting_leaves_no_engine_behind(tiny_checkpoint, signum) -> None:
    """SIGINT or SIGTERM as soon as the engine process exists (the front still importing): the
    server exits at once with 128 + the signal and stops the engine process itself, which is
    killed while the channel still listens, never left to find its front gone (a connection
    refused), and its channel's folder is removed. (SIGTERM used to kill the front at once and
    leave the engine loading; SIGINT used to wait for the front's imports, and a KeyboardInterrupt
    that landed in a weakref callback was swallowed: the server started and served on.)"""
    channels_before = set(Path(tempfile.gettempdir()).glob("ocula-*"))
    command = [sys.executable, "-m", "ocula.server.api_server"]
    model = str(tiny_checkpoint("llama"))
    front = subprocess.Popen(
        [*command, "--model_dir", model, "--port", str(free_port())],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    children: list[psutil.Process] = []
    deadline = time.monotonic() + 60
    while not children and front.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(psutil.NoSuchProcess):
            children = psutil.Process(front.pid).children(recursive=True)
        time.sleep(0.02)
    assert children, "no engine process was started beside the front"
    front.send_signal(signum)
    try:
        output = front.communicate(timeout=30)[0]
    except subprocess.TimeoutExpired:
        front.kill()
        raise AssertionError("the server did not exit after the signal while starting") from None
    assert front.returncode == 128 + signum, output
    assert_all_gone(children, timeout=5)
    assert "ConnectionRefusedError" not in output, output
    assert set(Path(tempfile.gettempdir()).glob("ocula-*")) <= channels_before
