"""Engine micro-benchmarks on a real-shape checkpoint loaded through Ocula's normal loader.

Parts (each against a limit measured in the same run by hardware.py; see accounting.py):
- decode: ms per `core.step()` at batch 1, 8, 64, 256 with 1,024-token prompts (random ids),
  after every prefill is done and 4 warm-up steps, over 32 timed steps; roofline = (weights read
  + K/V of every context token) / copy bandwidth; ratio = roofline / measured (1.0 = at the
  limit).
- gpu_idle: the GPU's idle share of a decode step at batch 64 (gpu_idle.py), measured last.
- prefill: one step computing an 8,192-token prompt (best of 3 after a warm-up), as a fraction of
  the bf16 matmul peak (FLOPs: linear layers + causal attention + one row of logits).
- vit: the engine's image encoder (CUDA graphs up to 16 tiles) on 1 and 32 random tiles (CUDA
  events, best of 10): ms and MFU; the model's eager `encode_images` beside it.
- agreement: greedy tokens of the agreement prompts, which engine_agreement.py compares with the
  fp32 reference of the same engine (run it after this script: it needs the GPU to itself).

    python -m benchmarks.bench_engine --checkpoint DIR --out engine.json [--tiny]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.accounting import (
    DecoderCost,
    decode_step_bytes,
    decode_weight_bytes,
    kv_bytes_per_token,
    vit_flops_per_tile,
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
    run_metadata,
    run_part,
    sync,
    time_call,
    write_json,
)
from benchmarks.engine_agreement import agreement_prompts, greedy_tokens
from benchmarks.engine_driver import (
    add_to_core,
    finish,
    step_until_all_sampled,
    timed_steps,
)
from benchmarks.gpu_idle import profile_busy
from benchmarks.hardware import (
    bandwidth_of,
    matmul_flops_of,
    sustained_matmul_flops_of,
    time_sustained,
)
from benchmarks.workloads import token_prompts

FULL = {
    "batches": (1, 8, 64, 256),
    "context": 1024,
    "warmup": 4,
    "timed": 32,
    "profiled": 8,
    "prefill": 8192,
    "tiles": (1, 32),
    "sustain_s": 3.0,
    "idle_batch": 64,
}
TINY = {
    "batches": (1, 4),
    "context": 64,
    "warmup": 2,
    "timed": 4,
    "profiled": 2,
    "prefill": 256,
    "tiles": (1, 4),
    "sustain_s": 0.2,
    "idle_batch": 4,
}
PARTS = ("agreement", "vit", "prefill", "decode")  # decode includes gpu_idle on a GPU
DECODE_MAX_NEW_TOKENS = 512


class EngineBench:
    def __init__(self, llm: Any, sizes: dict[str, Any], hardware: dict[str, Any]) -> None:
        self.llm = llm
        self.engine = llm.engine
        self.core = llm.engine.core
        self.runner = self.core.runner
        self.model = self.runner.model
        self.device = self.runner.device
        self.sizes = sizes
        self.bandwidth = bandwidth_of(hardware)
        self.peak = matmul_flops_of(hardware)
        self.sustained_peak = sustained_matmul_flops_of(hardware)
        config = self.model.config
        self.cost = DecoderCost.of(getattr(config, "text_config", config))
        self.weights = decode_weight_bytes(self.model)
        element = torch.empty((), dtype=self.runner.dtype).element_size()
        self.kv_per_token = kv_bytes_per_token(self.model, element)

    def describe(self) -> dict[str, Any]:
        from ocula.engine import model_runner

        resolve = getattr(model_runner, "resolve_attention_backend", None)
        requested = self.engine.args.attention_backend
        return {
            "attention_backend_resolved": resolve(requested, self.device) if resolve else None,
            "dtype": str(self.runner.dtype).removeprefix("torch."),
            "device": str(self.device),
            "language_weight_bytes": self.weights,
            "kv_bytes_per_token": self.kv_per_token,
            "kv_capacity_tokens": self.core.allocator.capacity,
            "decoder": vars(self.cost),
        }

    def decode(self, batch_size: int, deadline: Deadline, profile: bool = False) -> dict[str, Any]:
        """Times decode steps at `batch_size`; with `profile`, then profiles a few more steps for
        the GPU's idle share (run last: starting the profiler after CUDA graphs were captured is
        the step most likely to upset the engine)."""
        s = self.sizes
        prompts = token_prompts(10 + batch_size, batch_size, s["context"])
        # Requests prefilled early decode while later ones prefill (chunked prefill mixes them),
        # so none may run out of tokens before the timed steps end; they are aborted after.
        batch = add_to_core(self.engine, prompts, DECODE_MAX_NEW_TOKENS)
        try:
            prefill_steps = step_until_all_sampled(self.core, batch, deadline)
            for _ in range(s["warmup"]):
                batch.record(self.core.step())
            timing = timed_steps(self.core, batch, self.device, s["timed"])
            # K/V read per step, averaged over the timed steps (each adds one token per sequence).
            contexts = [n + (s["timed"] - 1) / 2 for n in timing.pop("context_lens_first_step")]
            step_bytes = decode_step_bytes(
                self.weights["read_per_step"], self.kv_per_token, contexts
            )
            all_weights = step_bytes + self.weights["embedding_table"]
            ms = timing["ms_per_step"]
            result = {
                "batch": batch_size,
                "context": s["context"],
                "prefill_steps": prefill_steps,
                "ms_per_step": ms,
                "output_tokens_per_s": batch_size / ms * 1e3,
                "bytes_per_step": step_bytes,
                "roofline_ms": step_bytes / self.bandwidth * 1e3,
                "roofline_ratio": step_bytes / self.bandwidth * 1e3 / ms,
                "roofline_ratio_counting_embedding_table": all_weights / self.bandwidth * 1e3 / ms,
                "pure_decode_steps": all(n == batch_size for n in timing["tokens_per_step"]),
                **{k: v for k, v in timing.items() if k != "tokens_per_step"},
            }
            log(
                f"decode batch {batch_size}: {ms:.2f} ms/step, ratio {result['roofline_ratio']:.3f}"
            )
            if not profile:
                return result
            steps = s["profiled"]

            def run_steps() -> None:
                for _ in range(steps):
                    batch.record(self.core.step())

            return {"decode": result, **profile_busy(run_steps, steps, ms, self.cost.layers)}
        finally:
            finish(self.core, batch)

    def prefill(self, deadline: Deadline) -> dict[str, Any]:
        tokens = self.sizes["prefill"]
        times: list[float] = []
        steps: list[int] = []
        for rep in range(4):  # the first is a warm-up
            batch = add_to_core(self.engine, token_prompts(500 + rep, 1, tokens), 1)
            sync(self.device)
            start = time.perf_counter()
            count = step_until_all_sampled(self.core, batch, deadline)
            sync(self.device)
            elapsed = time.perf_counter() - start
            finish(self.core, batch)
            if rep:
                times.append(elapsed)
                steps.append(count)
        best = min(times)
        flops = self.cost.prefill_flops(tokens)
        return {
            "tokens": tokens,
            "steps": steps,
            "best_ms": best * 1e3,
            "all_ms": [t * 1e3 for t in times],
            "flops": flops,
            "ideal_ms_at_peak": flops / self.peak * 1e3,
            "mfu": flops / best / self.peak,
            "tokens_per_s": tokens / best,
        }

    def vit(self) -> list[dict[str, Any]]:
        config = self.model.config
        size = config.image_size
        per_tile = vit_flops_per_tile(config)
        sustain_s = self.sizes["sustain_s"]
        # What the engine runs: a CUDA graph per tile count up to VISION_GRAPH_MAX_TILES.
        encode = self.runner.image_encoder.encode_images
        results = []
        for tiles in self.sizes["tiles"]:
            pixels = torch.randn(tiles, 3, size, size, device=self.device, dtype=self.runner.dtype)
            with torch.inference_mode():
                times = time_call(lambda p=pixels: encode(p), self.device, 3, 10)
                eager = time_call(lambda p=pixels: self.model.encode_images(p), self.device, 3, 10)
                steady = time_sustained(lambda p=pixels: encode(p), self.device, sustain_s)
            best, flops = min(times), tiles * per_tile
            row = {
                "tiles": tiles,
                "best_ms": best,
                "median_ms": sorted(times)[len(times) // 2],
                "eager_best_ms": min(eager),
                "flops": flops,
                "mfu": flops / (best / 1e3) / self.peak,
                # Both under the power limit: the encoder and the matmul run back to back.
                "sustained_ms": sorted(steady)[len(steady) // 2],
            }
            if self.sustained_peak:
                row["mfu_sustained"] = flops / (row["sustained_ms"] / 1e3) / self.sustained_peak
            results.append(row)
            sustained = f", sustained MFU {row['mfu_sustained']:.3f}" if self.sustained_peak else ""
            log(
                f"vit {tiles} tiles: {best:.2f} ms (eager {min(eager):.2f} ms), "
                f"MFU {row['mfu']:.3f}; sustained {row['sustained_ms']:.2f} ms{sustained}"
            )
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    add_switches_arg(parser)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset")
    parser.add_argument("--decode_batches", help="comma-separated batch sizes")
    args = parser.parse_args()
    deadline = Deadline(args.time_limit)
    parts = set(args.parts.split(","))
    sizes = dict(TINY if args.tiny else FULL)
    if args.decode_batches:
        sizes["batches"] = tuple(int(b) for b in args.decode_batches.split(","))
    results: dict[str, Any] = {"checkpoint": str(args.checkpoint)}
    exit_on_sigterm()
    try:
        results["switches"] = apply_switches(args.switches)
        options = engine_options(args.checkpoint, args.engine_args)
        started = time.monotonic()
        llm = make_llm(options)
        results["load_seconds"] = time.monotonic() - started
        results["options"] = options
        device = llm.engine.core.runner.device
        results["meta"] = run_metadata(device)
        hardware = hardware_peaks(args.hardware, device, args.tiny)
        results["hardware_used"] = {
            "copy_bytes_per_s": bandwidth_of(hardware),
            "matmul_flops_per_s": matmul_flops_of(hardware),
        }
        bench = EngineBench(llm, sizes, hardware)
        results["model"] = bench.describe()
        if "agreement" in parts:

            def agreement_tokens() -> dict[str, Any]:
                tokens = greedy_tokens(llm, agreement_prompts(args.tiny), args.tiny)
                return {"tokens": tokens}

            run_part("agreement_tokens", results, agreement_tokens, deadline, 20)
        if "vit" in parts and hasattr(bench.model, "encode_images"):
            run_part("vit", results, bench.vit, deadline, 15)
        if "prefill" in parts:
            run_part("prefill", results, lambda: bench.prefill(deadline), deadline, 20)
        if "decode" in parts:
            results["decode"] = {}
            for batch_size in sizes["batches"]:
                run_part(
                    str(batch_size),
                    results["decode"],
                    lambda b=batch_size: bench.decode(b, deadline),
                    deadline,
                    20,
                )
            if device.type == "cuda":

                def gpu_idle() -> dict[str, Any]:
                    return bench.decode(sizes["idle_batch"], deadline, profile=True)

                run_part("gpu_idle", results, gpu_idle, deadline, 20)
    finally:
        write_json(args.out, results)


if __name__ == "__main__":
    main()
