"""Offline throughput of Ocula's `LLM` engine on fixed workloads, against their floor and a peer.

Workloads (workloads.py; greedy, ignore_eos, every request in the engine at once):
- multimodal: 256 requests, one distinct 448 x 448 JPEG each + a question of 60 words (about 70
  text tokens with the chat template), 256 new tokens each;
- text_only: the text twin, 256 prompts of 320 random token ids, 256 new tokens each.
Ocula is timed from `add_requests` (tokenization and image decoding included) to the
last finished request, after a short warm-up run (kernel compilation excluded).

Floor (accounting.workload_floor): every prompt's prefill FLOPs (plus the ViT's for the images)
at the measured bf16 matmul peak, plus 255 decode steps (the first token comes from prefill)
each reading the language model's weights and all 256 sequences' K/V at the measured copy
bandwidth. ratio_to_floor = floor / measured time (1.0 = at the floor).

Peer: transformers' `generate_batch` on the text twin checkpoint (same weights), run first in
its own process (offline_transformers.py) so that each gets the whole GPU. Ocula runs the text
workload on the InternVL checkpoint it already loaded: its language model holds exactly the
twin's tensors (checkpoints.py writes both from the same draws), so a second 15 GB load is
saved.

    python -m benchmarks.bench_offline --checkpoint VLM_DIR --text_checkpoint TEXT_DIR --out o.json
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.accounting import (
    DecoderCost,
    decode_weight_bytes,
    kv_bytes_per_token,
    vit_flops_per_tile,
    workload_floor,
)
from benchmarks.common import (
    Deadline,
    add_common_args,
    add_switches_arg,
    apply_switches,
    engine_options,
    exit_on_sigterm,
    hardware_peaks,
    log,
    make_llm,
    read_json,
    run_metadata,
    run_part,
    write_json,
)
from benchmarks.engine_driver import run_offline
from benchmarks.hardware import bandwidth_of, matmul_flops_of
from benchmarks.workloads import (
    MULTIMODAL,
    TEXT_ONLY,
    TINY_MULTIMODAL,
    TINY_TEXT_ONLY,
    OfflineWorkload,
    image_prompt,
    token_prompts,
)


def run_peer(text_checkpoint: Path, tiny: bool, timeout: float) -> dict[str, Any]:
    out = Path(tempfile.mkdtemp(prefix="ocula-peer-")) / "transformers.json"
    command = [sys.executable, "-m", "benchmarks.offline_transformers"]
    command += ["--checkpoint", str(text_checkpoint), "--out", str(out)]
    if tiny:
        command.append("--tiny")
    try:
        subprocess.run(command, check=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {timeout:.0f} s", "seconds_at_least": timeout}
    return read_json(out)


def warm_up(engine: Any) -> float:
    """A few short requests of both kinds, so that one-time compilation is not timed; seconds."""
    prompts: list[Any] = [image_prompt(900 + i, 20) for i in range(4)]
    prompts += token_prompts(901, 4, 64)
    started = time.perf_counter()
    run_offline(engine, prompts, 8, Deadline(None))
    return time.perf_counter() - started


class OfflineBench:
    def __init__(self, llm: Any, hardware: dict[str, Any]) -> None:
        self.engine = llm.engine
        runner = self.engine.core.runner
        self.model = runner.model
        config = self.model.config
        self.cost = DecoderCost.of(getattr(config, "text_config", config))
        self.weights = decode_weight_bytes(self.model)["read_per_step"]
        element = torch.empty((), dtype=runner.dtype).element_size()
        self.kv_per_token = kv_bytes_per_token(self.model, element)
        self.bandwidth = bandwidth_of(hardware)
        self.peak = matmul_flops_of(hardware)

    def warm_up(self) -> float:
        return warm_up(self.engine)

    def floor(self, workload: OfflineWorkload, prompts: list[Any]) -> dict[str, float]:
        lengths, image_tokens = [], 0
        for prompt in prompts:
            token_ids, spans = self.engine.tokenize(prompt)
            lengths.append(len(token_ids))
            image_tokens += sum(span.length for span in spans)
        vit_flops = 0.0
        if image_tokens:
            tiles = image_tokens // self.model.tokens_per_tile
            vit_flops = tiles * vit_flops_per_tile(self.model.config)
        return workload_floor(
            self.cost,
            lengths,
            workload.new_tokens,
            self.weights,
            self.kv_per_token,
            self.bandwidth,
            self.peak,
            vit_flops,
        )

    def run(self, workload: OfflineWorkload, deadline: Deadline) -> dict[str, Any]:
        prompts = workload.prompts(seed=7)
        floor = self.floor(workload, prompts)
        run = run_offline(self.engine, prompts, workload.new_tokens, deadline)
        result = {"workload": vars(workload), **run.summary(), "floor": floor}
        result["ratio_to_floor"] = floor["floor_s"] / run.seconds
        log(
            f"{workload.name}: {run.seconds:.2f} s, {result['output_tokens_per_s']:,.0f} tok/s, "
            f"floor {floor['floor_s']:.2f} s (ratio {result['ratio_to_floor']:.3f})"
        )
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    add_switches_arg(parser)
    parser.add_argument("--checkpoint", type=Path, required=True, help="the InternVL checkpoint")
    parser.add_argument("--text_checkpoint", type=Path, help="text twin, for transformers")
    parser.add_argument("--peer_timeout", type=float, default=240.0)
    args = parser.parse_args()
    deadline = Deadline(args.time_limit)
    results: dict[str, Any] = {"checkpoint": str(args.checkpoint)}
    exit_on_sigterm()
    try:
        if args.text_checkpoint is not None:
            # Ocula needs about a minute after it (load, warm-up, both workloads).
            timeout = min(args.peer_timeout, max(30.0, deadline.remaining() - 70))
            run_part(
                "transformers",
                results,
                lambda: run_peer(args.text_checkpoint, args.tiny, timeout),
                deadline,
                60,
            )
        results["switches"] = apply_switches(args.switches)
        options = engine_options(args.checkpoint, args.engine_args)
        started = time.monotonic()
        llm = make_llm(options)
        results["load_seconds"] = time.monotonic() - started
        results["options"] = options
        device = llm.engine.core.runner.device
        results["meta"] = run_metadata(device)
        bench = OfflineBench(llm, hardware_peaks(args.hardware, device, args.tiny))
        results["warmup_seconds"] = bench.warm_up()
        workloads = (TINY_MULTIMODAL, TINY_TEXT_ONLY) if args.tiny else (MULTIMODAL, TEXT_ONLY)
        for workload in workloads:
            run_part(
                workload.name, results, lambda w=workload: bench.run(w, deadline), deadline, 10
            )
        peer, text = results.get("transformers", {}), results.get("text_only", {})
        if "seconds" in peer and "seconds" in text:
            text["speedup_vs_transformers"] = peer["seconds"] / text["seconds"]
            text["output_tokens_per_s_vs_transformers"] = (
                text["output_tokens_per_s"] / peer["output_tokens_per_s"]
            )
        elif "seconds_at_least" in peer and "seconds" in text:  # transformers timed out
            text["speedup_vs_transformers_at_least"] = peer["seconds_at_least"] / text["seconds"]
    finally:
        write_json(args.out, results)


if __name__ == "__main__":
    main()
