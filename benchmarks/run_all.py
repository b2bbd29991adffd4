"""The whole benchmark suite in one command, inside a time budget.

Runs, each in its own process (so each gets the whole GPU, and a part that overruns is stopped
without losing the others): checkpoints, hardware, engine, offline (transformers first, then
Ocula), serving, agreement (the fp32 reference against the engine part's greedy tokens) and,
when at least `EXTRA_MIN_S` seconds remain, the InternVL2.5-8B checkpoint through the engine
benchmark (decode at batch 1 and 64, prefill). `--model internvl2_5-8b` runs the whole suite on
InternVL2.5-8B instead (no transformers peer then: its text twin is InternVL3-8B's Qwen2). Each part gets a deadline from what remains of
`--budget_s` (a part's own `--time_limit` a little shorter, so it stops measuring and writes its
JSON first). After every part the combined results are rewritten to
`<results_dir>/<gpu>-<date>.json`; at the end the Markdown section for BENCHMARKS.md is printed
and written next to it (`.md`), with every part's output in `.log`.

    python -m benchmarks.run_all                       # on the GPU machine, about 7-9 minutes
    python -m benchmarks.run_all --tiny --budget_s 900 # the same pipeline on a CPU
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO_ROOT, Deadline, log, read_json, write_json
from benchmarks.report import markdown
from benchmarks.shapes import model_spec, text_twin_name

# part -> (longest it may take on a GPU, least time worth starting it with), seconds.
CAPS = {
    "checkpoints": (200, 30),
    "hardware": (60, 10),
    "engine": (150, 45),
    "offline": (240, 60),
    "serving": (150, 45),
    "agreement": (120, 40),
    "internvl2_5_checkpoint": (120, 20),
    "internvl2_5": (120, 40),
}
EXTRA_MIN_S = 100
MARGIN_S = 15  # a part's --time_limit is this much shorter than the deadline it is killed at


class Suite:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.deadline = Deadline(args.budget_s)
        self.work = Path(tempfile.mkdtemp(prefix="ocula-bench-parts-"))
        self.log_path = self.work / "suite.log"
        self.log_file = self.log_path.open("w")
        self.results: dict[str, Any] = {
            "command": shlex.join(
                [Path(sys.executable).name, "-m", "benchmarks.run_all", *sys.argv[1:]]
            ),
            "budget_s": args.budget_s,
            "tiny": args.tiny,
            "model": args.model,
            "parts": {},
        }
        self.results_path: Path | None = None

    def run(self, name: str, module: str, *flags: str) -> dict[str, Any] | None:
        """Runs `python -m benchmarks.<module> ... --out <json>`; returns its JSON or None."""
        cap, least = CAPS[name]
        cap = cap * 4 if self.args.tiny else cap  # a CPU is slow, but the tiny sizes are small
        timeout = min(cap, self.deadline.remaining() - 5)
        record: dict[str, Any] = {}
        self.results["parts"][name] = record
        if timeout < least:
            record["status"] = f"skipped: {self.deadline.remaining():.0f} s of the budget left"
            log(f"== {name}: {record['status']}")
            return None
        out = self.work / f"{name}.json"
        command = [sys.executable, "-m", f"benchmarks.{module}", "--out", str(out), *flags]
        if module.startswith("bench_"):
            command += ["--time_limit", str(round(max(10.0, timeout - MARGIN_S)))]
        if self.args.tiny:
            command.append("--tiny")
        log(f"== {name}: {shlex.join(command[1:])} (deadline {timeout:.0f} s)")
        started = time.monotonic()
        code = self._run_logged(command, timeout)
        record["seconds"] = time.monotonic() - started
        record["exit_code"] = code
        if out.is_file():
            record["status"] = "ok" if code == 0 else f"partial (exit code {code})"
            record["result"] = read_json(out)
        else:
            record["status"] = f"failed (exit code {code}): see the log"
        log(f"== {name}: {record['status']} in {record['seconds']:.0f} s")
        self.save()
        return record.get("result")

    def _run_logged(self, command: list[str], timeout: float) -> int:
        """Runs `command`, copying its output to the console and the log; stops it (SIGTERM to
        its process group, then SIGKILL) at `timeout`."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.setdefault("LOADWORKER", "8")  # threads reading checkpoint shards (Ocula's loader)
        process = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )

        def stop() -> None:
            log(f"part over its deadline of {timeout:.0f} s: stopping it")
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, stop)
        timer.start()
        try:
            assert process.stdout is not None
            for line in process.stdout:
                sys.stderr.write(line)
                self.log_file.write(line)
            return process.wait()
        finally:
            timer.cancel()
            self.log_file.flush()

    def name_results(self, hardware: dict[str, Any] | None) -> None:
        device = (hardware or {}).get("device", "unknown-device")
        slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")[:48]
        day = datetime.date.today().isoformat()
        results_dir = self.args.results_dir
        results_dir.mkdir(parents=True, exist_ok=True)
        path = results_dir / f"{slug}-{day}.json"
        index = 2
        while path.exists():
            path = results_dir / f"{slug}-{day}-{index}.json"
            index += 1
        self.results_path = path
        self.results["meta"] = (hardware or {}).get("meta", {})
        self.save()

    def save(self) -> None:
        if self.results_path is not None:
            write_json(self.results_path, self.results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on any device (CPU)")
    parser.add_argument("--budget_s", type=float, default=540.0, help="whole suite, seconds")
    parser.add_argument("--ckpt_dir", type=Path, help="default: /dev/shm/ocula-bench if room")
    parser.add_argument("--results_dir", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--engine_args", default="", help="engine flags for every part")
    parser.add_argument("--internvl2_5", choices=("auto", "yes", "no"), default="auto")
    parser.add_argument(
        "--model", choices=("internvl3-8b", "internvl2_5-8b"), default="internvl3-8b"
    )
    args = parser.parse_args()
    suite = Suite(args)
    from benchmarks.checkpoints import default_root

    root = args.ckpt_dir or default_root([args.model], args.tiny)
    checkpoint = root / model_spec(args.model, args.tiny).name
    main_model = args.model == "internvl3-8b"
    engine_flags = ["--engine_args", args.engine_args]
    suite.run("checkpoints", "checkpoints", "--out_dir", str(root), "--models", args.model)
    hardware = suite.run("hardware", "hardware")
    suite.name_results(hardware)
    hw = ["--hardware", str(suite.work / "hardware.json")] if hardware else []
    engine = suite.run(
        "engine", "bench_engine", "--checkpoint", str(checkpoint), *hw, *engine_flags
    )
    offline = ["--checkpoint", str(checkpoint)]
    if main_model:
        offline += ["--text_checkpoint", str(root / text_twin_name(args.tiny))]
    suite.run("offline", "bench_offline", *offline, *hw, *engine_flags)
    server_log = suite.work / "server.log"
    serving = ["--checkpoint", str(checkpoint), "--log", str(server_log)]
    suite.run("serving", "bench_serving", *serving, *hw, *engine_flags)
    if engine is not None and "tokens" in engine.get("agreement_tokens", {}):
        agreement = [
            "--checkpoint",
            str(checkpoint),
            "--compare_with",
            str(suite.work / "engine.json"),
        ]
        suite.run("agreement", "engine_agreement", *agreement, *engine_flags)
    else:
        suite.results["parts"]["agreement"] = {"status": "skipped: no engine tokens to compare"}
    wanted = main_model and (
        args.internvl2_5 == "yes"
        or (args.internvl2_5 == "auto" and suite.deadline.allows(EXTRA_MIN_S))
    )
    if wanted:
        built = suite.run(
            "internvl2_5_checkpoint",
            "checkpoints",
            "--out_dir",
            str(root),
            "--models",
            "internvl2_5-8b",
        )
        extra = ["--checkpoint", str(root / model_spec("internvl2_5-8b", args.tiny).name)]
        extra += ["--parts", "prefill,decode", "--decode_batches", "1,64"]
        if built is not None:
            suite.run("internvl2_5", "bench_engine", *extra, *hw, *engine_flags)
    elif main_model:
        suite.results["parts"]["internvl2_5"] = {"status": "skipped: not enough budget left"}
    suite.save()
    report = markdown(suite.results)
    print(report)
    if suite.results_path is not None:
        suite.results_path.with_suffix(".md").write_text(report)
        suite.log_file.close()
        logs = suite.log_path.read_text()
        if server_log.is_file():
            logs += "\n==== server log (serving part)\n" + server_log.read_text(errors="replace")
        suite.results_path.with_suffix(".log").write_text(logs)
        log(f"results: {suite.results_path} (.md, .log beside it)")


if __name__ == "__main__":
    main()
