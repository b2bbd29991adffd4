"""Tensor parallelism and the ViT's data/tensor parallelism, layout by layout, on one machine.

For each layout (tp, visual_dp, visual_tp) this runs parallel_layout.py in a fresh process (it
starts the other ranks itself, as the server's engine process does, and stops them at its
end, so every layout starts on free GPUs and ports): greedy tokens of 32 prompts x 16 tokens,
compared here with tp=1's (agreement rate and first divergence per prompt, reported, never
asserted); decode ms per step at batch 64 with 1k-token contexts; ViT images/s of the
vision-encoder stage; and, optionally, offline throughput on the multimodal workload of
bench_offline.py. Default layouts: tp=1, then tp=2 with ViT (1 x 2) and (2 x 1), then on 4
GPUs tp=4 with (1 x 4), (2 x 2) and (4 x 1).

The checkpoint is checkpoints.py's InternVL3-8B (built there, or reused from its folder). The
whole run keeps to `--budget_s`: each layout gets a fair share of what is left (a layout that
finishes early leaves its time to the next), and its parts are skipped, with the reason, when
they would not fit. Writes `<results_dir>/parallel-<gpu>-<date>.json`, `.md` (printed at the
end) and `.log` (every process's output).

    python -m benchmarks.bench_parallel --results_dir "$OUT"              # 2 or 4 GPUs
    python -m benchmarks.bench_parallel --tiny --ranks 4 --budget_s 900   # CPU, gloo
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from benchmarks.common import REPO_ROOT, Deadline, log, read_json, write_json
from benchmarks.engine_agreement import compare
from benchmarks.parallel_report import markdown
from benchmarks.shapes import model_spec
from benchmarks.workloads import MULTIMODAL

# NVLink multicast (NVLS) stays off on the lent multi-GPU machines; the ranks inherit these.
MULTICAST_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
CHECKPOINT_CAP_S = 200
LAYOUT_LEAST_S = 45  # process start + a 16 GB load + the tokens part; less is not worth starting
MARGIN_S = 10  # a layout's --time_limit is this much shorter than its share
STOP_GRACE_S = 20  # after its share: SIGTERM (partial results are kept), then SIGKILL


@dataclass(frozen=True)
class Layout:
    tp: int
    visual_dp: int
    visual_tp: int

    @classmethod
    def parse(cls, text: str) -> Layout:
        """`TP` (the ViT split like the LLM) or `TP:DPxVTP`, e.g. `4:2x2`."""
        match = re.fullmatch(r"(\d+)(?::(\d+)x(\d+))?", text.strip())
        if match is None:
            raise argparse.ArgumentTypeError(f"layout {text!r} is not TP or TP:DPxVTP (4:2x2)")
        tp = int(match[1])
        dp, vtp = (int(match[2]), int(match[3])) if match[2] else (1, tp)
        if tp < 1 or dp * vtp != tp:
            raise argparse.ArgumentTypeError(f"layout {text!r}: visual_dp x visual_tp != tp")
        return cls(tp, dp, vtp)

    @property
    def name(self) -> str:
        return f"tp{self.tp}-vit{self.visual_dp}x{self.visual_tp}"


def default_layouts(ranks: int) -> list[Layout]:
    layouts = [Layout(1, 1, 1)]
    for tp in (2, 4):
        if tp <= ranks:
            layouts += [Layout(tp, dp, tp // dp) for dp in range(1, tp + 1) if tp % dp == 0]
    return layouts


def run_logged(command: list[str], timeout: float, log_file: IO[str]) -> int:
    """Runs `command` in its own process group with its output in `log_file`. At `timeout`:
    SIGTERM to the group (the layout writes what it measured), SIGKILL after STOP_GRACE_S.
    Every process of the group is gone when this returns (its GPU memory is free)."""
    env = {**os.environ, **MULTICAST_OFF, "PYTHONUNBUFFERED": "1"}
    env.setdefault("LOADWORKER", "8")  # threads reading checkpoint shards (Ocula's loader)
    log_file.write(f"\n==== {shlex.join(command)}\n")
    log_file.flush()
    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        return process.wait(max(1.0, timeout))
    except subprocess.TimeoutExpired:
        log(f"over its {timeout:.0f} s: stopping it")
        os.killpg(process.pid, signal.SIGTERM)
        try:
            return process.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            return process.wait()
    finally:
        with contextlib.suppress(ProcessLookupError):  # followers outliving a killed rank 0
            os.killpg(process.pid, signal.SIGKILL)


def _tail(path: Path, start: int, lines: int = 25) -> str:
    with path.open(errors="replace") as f:
        f.seek(start)
        return "".join(f.read().splitlines(keepends=True)[-lines:])


def results_path(results_dir: Path, device: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")[:48] or "unknown-device"
    day = datetime.date.today().isoformat()
    path = results_dir / f"parallel-{slug}-{day}.json"
    index = 2
    while path.exists():
        path = results_dir / f"parallel-{slug}-{day}-{index}.json"
        index += 1
    return path


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def run_layout(
    args: argparse.Namespace, layout: Layout, checkpoint: Path, timeout: float, log_file: IO[str]
) -> dict[str, Any]:
    """Runs parallel_layout.py for `layout` within `timeout` seconds: status, seconds, exit code
    and its results (also those of a layout stopped at its deadline)."""
    out = args.results_dir / f"parallel-{os.getpid()}-{layout.name}.json"
    command = [sys.executable, "-m", "benchmarks.parallel_layout", "--checkpoint", str(checkpoint)]
    command += ["--out", str(out), "--time_limit", f"{timeout - MARGIN_S:.0f}"]
    command += ["--tp", str(layout.tp), "--visual_dp", str(layout.visual_dp)]
    command += ["--visual_tp", str(layout.visual_tp), "--engine_args", args.engine_args]
    command += ["--visual_infer_batch_size", str(args.visual_infer_batch_size)]
    command += ["--offline_requests", str(args.offline_requests)]
    command += ["--offline_new_tokens", str(args.offline_new_tokens)]
    command += ["--tiny"] if args.tiny else []
    log_path = Path(log_file.name)
    offset = log_path.stat().st_size
    started = time.monotonic()
    code = run_logged(command, timeout, log_file)
    record: dict[str, Any] = {"seconds": time.monotonic() - started, "exit_code": code}
    if out.is_file():
        record["result"] = read_json(out)
        out.unlink()
        record["status"] = "ok" if code == 0 else f"partial (exit code {code})"
    else:
        record["status"] = f"failed (exit code {code})"
    if code != 0:
        log(f"{layout.name} output, last lines:\n{_tail(log_path, offset)}")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--layouts", nargs="+", type=Layout.parse, help="e.g. 1 2:1x2 2:2x1 (default: by --ranks)"
    )
    parser.add_argument("--ranks", type=int, help="GPUs to use (default: all; CPU: 2)")
    parser.add_argument("--budget_s", type=float, default=540.0, help="whole run, seconds")
    parser.add_argument("--ckpt_dir", type=Path, help="default: checkpoints.py's folder")
    parser.add_argument("--results_dir", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--engine_args", default="", help="engine flags for every layout")
    parser.add_argument("--visual_infer_batch_size", type=int, default=8)
    parser.add_argument(
        "--offline_requests", type=int, help="multimodal workload size; 0: no offline part"
    )
    parser.add_argument("--offline_new_tokens", type=int, help="output tokens per request")
    parser.add_argument("--tiny", action="store_true", help="tiny checkpoint; CPU with gloo")
    parser.add_argument("--report", type=Path, help="print the table of this JSON and exit")
    args = parser.parse_args()
    if args.report is not None:
        print(markdown(read_json(args.report)))
        return
    deadline = Deadline(args.budget_s)
    gpus = gpu_count()
    ranks = args.ranks or gpus or 2
    if gpus and ranks > gpus:
        parser.error(f"--ranks {ranks}: this machine has {gpus} GPU(s)")
    layouts = args.layouts or default_layouts(ranks)
    too_wide = [layout.name for layout in layouts if layout.tp > ranks]
    if too_wide:
        parser.error(f"layouts {too_wide} need more than --ranks {ranks}")
    if args.offline_requests is None:
        args.offline_requests = 8 if args.tiny else MULTIMODAL.requests
    if args.offline_new_tokens is None:
        args.offline_new_tokens = 16 if args.tiny else MULTIMODAL.new_tokens

    from benchmarks.checkpoints import default_root

    root = args.ckpt_dir or default_root(["internvl3-8b"], args.tiny)
    checkpoint = root / model_spec("internvl3-8b", args.tiny).name
    args.results_dir.mkdir(parents=True, exist_ok=True)
    work_log = args.results_dir / f"parallel-run-{os.getpid()}.log"
    interim = work_log.with_suffix(".json")
    results: dict[str, Any] = {
        "command": shlex.join(
            [Path(sys.executable).name, "-m", "benchmarks.bench_parallel", *sys.argv[1:]]
        ),
        "budget_s": args.budget_s,
        "tiny": args.tiny,
        "ranks": ranks,
        "gpus_visible": gpus,
        "checkpoint": str(checkpoint),
        "environment": MULTICAST_OFF,
        "layouts": {},
    }
    with work_log.open("w") as log_file:
        log(f"checkpoint {checkpoint} (output of every process: {work_log})")
        command = [sys.executable, "-m", "benchmarks.checkpoints", "--out_dir", str(root)]
        command += ["--models", "internvl3-8b"] + (["--tiny"] if args.tiny else [])
        started = time.monotonic()
        code = run_logged(command, min(CHECKPOINT_CAP_S, deadline.remaining()), log_file)
        results["checkpoint_seconds"] = time.monotonic() - started
        if code != 0:
            log(f"checkpoint build failed (exit code {code}):\n{_tail(work_log, 0)}")
            raise SystemExit(1)
        for index, layout in enumerate(layouts):
            record: dict[str, Any] = {"layout": asdict(layout)}
            results["layouts"][layout.name] = record
            share = (deadline.remaining() - STOP_GRACE_S) / (len(layouts) - index)
            timeout = min(deadline.remaining() - STOP_GRACE_S, max(share, LAYOUT_LEAST_S))
            if timeout < LAYOUT_LEAST_S:
                record["status"] = f"skipped: {deadline.remaining():.0f} s of the budget left"
                log(f"== {layout.name}: {record['status']}")
                continue
            log(f"== {layout.name}: up to {timeout:.0f} s")
            record.update(run_layout(args, layout, checkpoint, timeout, log_file))
            log(f"== {layout.name}: {record['status']} in {record['seconds']:.0f} s")
            add_agreement(results)
            write_json(interim, results)  # kept if this command is stopped before the end
    metas = [
        r["result"]["meta"] for r in results["layouts"].values() if "meta" in r.get("result", {})
    ]
    results["meta"] = metas[0] if metas else {}
    path = results_path(args.results_dir, results["meta"].get("device", "unknown-device"))
    write_json(path, results)
    interim.unlink(missing_ok=True)
    report = markdown(results)
    path.with_suffix(".md").write_text(report)
    work_log.replace(path.with_suffix(".log"))
    print(report)
    log(f"results: {path} (.md, .log beside it)")


def add_agreement(results: dict[str, Any]) -> None:
    """Each layout's greedy tokens against tp=1's, into its record's `agreement`."""
    reference = results["layouts"].get("tp1-vit1x1", {}).get("result", {}).get("tokens")
    for name, record in results["layouts"].items():
        tokens = record.get("result", {}).get("tokens")
        if name == "tp1-vit1x1" or not isinstance(tokens, list):
            continue
        if not isinstance(reference, list):
            record["agreement"] = {"error": "no tp=1 tokens to compare with"}
        else:
            record["agreement"] = compare(tokens, reference)


if __name__ == "__main__":
    main()
