"""What every benchmark script shares: flags, engine options, timing, run metadata, JSON files.

Conventions of all scripts:
- each writes one JSON object (`--out`) and logs progress lines to stderr;
- `--time_limit` seconds bound the whole script: parts that would start after it are recorded as
  skipped, never silently dropped;
- `--engine_args` is a string of the engine's own flags (`"--attention_backend triton
  --disable_cudagraph"`), parsed by Ocula's flag parser, so the scripts run the engine exactly
  as configured there and everything else at its default; the options used are recorded.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT_NAMES = ("internvl3-8b", "qwen2.5-7b-text", "internvl2_5-8b")


def exit_on_sigterm() -> None:
    """Turns SIGTERM (run_all's deadline) into SystemExit, so that `finally` blocks still write
    the partial results and stop child processes."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def log(message: str) -> None:
    stamp = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", file=sys.stderr, flush=True)


class Deadline:
    """A wall-clock budget in seconds (None: unlimited), started at construction."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.start = time.monotonic()

    def remaining(self) -> float:
        if self.seconds is None:
            return float("inf")
        return self.seconds - (time.monotonic() - self.start)

    def allows(self, needed_s: float) -> bool:
        """Whether `needed_s` more seconds fit in the budget."""
        return self.remaining() >= needed_s


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, a few requests (CPU)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument(
        "--engine_args", default="", help='engine flags, e.g. "--attention_backend triton"'
    )
    parser.add_argument(
        "--hardware", type=Path, help="hardware.py's JSON of this run (measured here if absent)"
    )
    parser.add_argument("--time_limit", type=float, help="seconds this script may take")


# Kernel paths an A/B can turn off in this process before the engine is built: the engine's module
# constants that choose them (`--switches "fold_row_norms=off,pdl=off"`).
KERNEL_SWITCHES = {
    "gemv": ("ocula.layers.linear", "USE_GEMV"),
    "gemv_tiles": ("ocula.kernels.gemv", "WIDE_TILES"),
    "skinny": ("ocula.layers.linear", "USE_SKINNY"),
    "skinny_tma": ("ocula.kernels.skinny_linear", "USE_TMA"),
    "pdl": ("ocula.kernels", "USE_PDL"),
    "fold_row_norms": ("ocula.models.folded_row", "FOLD_ROW_NORMS"),
    "rotate_in_decode": ("ocula.attention.triton_backend", "ROTATE_IN_DECODE"),
    "short_chunk_blocks": ("ocula.kernels.prefill_attention", "SHORT_CHUNK_BLOCKS"),
    "table_activation": ("ocula.models.intern_vit", "USE_TABLE_ACTIVATIONS"),
    "pingpong": ("ocula.models.intern_vit_linear", "USE_PINGPONG"),
    "vit_short_tails": ("ocula.kernels.vit_attention", "SHORT_TAILS"),
}


def add_switches_arg(parser: argparse.ArgumentParser) -> None:
    names = ", ".join(KERNEL_SWITCHES)
    parser.add_argument(
        "--switches", default="", help=f"comma-separated NAME=on|off of the kernel paths {names}"
    )


def apply_switches(spec: str) -> dict[str, bool]:
    """Sets the engine constants `spec` names ("fold_row_norms=off,pdl=on"); returns every
    switch's value afterwards, for the results. Call before building the engine."""
    import importlib

    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, value = item.partition("=")
        if name not in KERNEL_SWITCHES or value not in ("on", "off"):
            raise SystemExit(
                f"--switches: {item!r} is not NAME=on|off with NAME in {list(KERNEL_SWITCHES)}"
            )
        module, constant = KERNEL_SWITCHES[name]
        setattr(importlib.import_module(module), constant, value == "on")
    return {
        name: bool(getattr(importlib.import_module(module), constant))
        for name, (module, constant) in KERNEL_SWITCHES.items()
    }


def engine_options(model_dir: Path, engine_args: str, **forced: Any) -> dict[str, Any]:
    """Every EngineArgs field for `model_dir`: defaults, then `engine_args` (engine flag syntax),
    then `forced`. A forced option the engine does not have is left out (the returned dict
    records only real fields), so the scripts run on engines with fewer options."""
    from ocula.cli_args import parse_config
    from ocula.config import EngineArgs

    argv = ["--model_dir", str(model_dir), *shlex.split(engine_args)]
    parsed = parse_config(EngineArgs, argv, "engine options of a benchmark")
    options = dataclasses.asdict(parsed)
    for name, value in forced.items():
        if name in options:
            options[name] = value
        else:
            log(f"this engine has no option {name!r}: left at the engine's behaviour")
    return options


def make_llm(options: dict[str, Any]) -> Any:
    from ocula import LLM

    return LLM(**options)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, warmup: int, reps: int) -> list[float]:
    """Milliseconds of each of `reps` calls of `fn` after `warmup` calls: CUDA events on a GPU
    (device time of the work `fn` queues), wall clock around a synchronous call elsewhere."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def run_metadata(device: torch.device) -> dict[str, Any]:
    """GPU, date, library versions and the source revision of this run."""
    import transformers

    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "device": device_name(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "ocula_commit": _git("rev-parse", "--short", "HEAD"),
        "ocula_tree_modified": bool(status) if status is not None else None,
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
    }


def graph_us(products: list[Any], device: torch.device, reps: int = 10) -> float:
    """Median microseconds per product of one CUDA graph of `products`; NaN off CUDA (the tiny
    CPU run only exercises the code)."""

    def run() -> None:
        for product in products:
            product()

    if device.type != "cuda":
        return float("nan")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # compiles and warms outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / len(products))
    return sorted(times)[len(times) // 2]


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def hardware_peaks(path: Path | None, device: torch.device, tiny: bool) -> dict[str, Any]:
    """hardware.py's results from `path`, or measured now when no file is given."""
    if path is not None and path.is_file():
        return read_json(path)
    from benchmarks.hardware import measure

    return measure(device, tiny)


def run_part(
    name: str, results: dict[str, Any], fn: Callable[[], Any], deadline: Deadline, needs_s: float
) -> None:
    """Runs one measurement into `results[name]`: skipped (with the reason) when fewer than
    `needs_s` seconds remain; an exception is logged with its traceback and recorded as the
    part's error, so one broken measurement does not lose the others."""
    if not deadline.allows(needs_s):
        results[name] = {"skipped": f"time limit: {deadline.remaining():.0f} s left"}
        log(f"{name}: skipped (time limit)")
        return
    log(f"{name}: start")
    t0 = time.monotonic()
    try:
        results[name] = fn()
    except Exception as error:  # recorded in the results, not hidden
        import traceback

        traceback.print_exc()
        results[name] = {"error": f"{type(error).__name__}: {error}"}
    log(f"{name}: done in {time.monotonic() - t0:.1f} s")
