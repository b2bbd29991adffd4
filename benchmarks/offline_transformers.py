"""The peer: transformers' continuous batching (`generate_batch`) on the text-only twin workload.

Loads the text twin checkpoint with `AutoModelForCausalLM.from_pretrained` (bf16 on a GPU, the
default attention implementation), disables EOS (the engine's `ignore_eos`), runs one small
warm-up call, then times one `generate_batch` call over the whole workload: its wall time
includes what that call does before generating (cache sizing, CUDA-graph capture when it
decides to), as a user calling it pays. Only the keyword arguments the installed version's
`generate_batch` signature has are passed, so 5.17 and 5.23 both run.

    python -m benchmarks.offline_transformers --checkpoint DIR --out hf.json [--tiny]
"""

from __future__ import annotations

import argparse
import inspect
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import log, pick_device, run_metadata, write_json
from benchmarks.workloads import TEXT_ONLY, TINY_TEXT_ONLY, token_prompts


def _generated_tokens(output: Any) -> int:
    tokens = getattr(output, "generated_tokens", None)
    if tokens is None and isinstance(output, dict):
        tokens = output.get("generated_tokens")
    return len(tokens or [])


def generate_batch(model: Any, prompts: list[list[int]], new_tokens: int) -> tuple[float, int]:
    """(seconds, output tokens) of one `generate_batch` call, greedy, EOS disabled."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
    accepted = inspect.signature(model.generate_batch).parameters
    kwargs: dict[str, Any] = {"generation_config": config}
    if "progress_bar" in accepted:
        kwargs["progress_bar"] = False
    if "max_new_tokens" in accepted:
        kwargs["max_new_tokens"] = new_tokens
    start = time.perf_counter()
    outputs = model.generate_batch(prompts, **kwargs)
    elapsed = time.perf_counter() - start
    values = outputs.values() if isinstance(outputs, dict) else outputs
    return elapsed, sum(_generated_tokens(o) for o in values)


def run(checkpoint: Path, tiny: bool) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    device = pick_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=dtype, device_map=device)
    model.eval()
    load_seconds = time.perf_counter() - started
    # ignore_eos: with no EOS anywhere, transformers' continuous batching never stops early.
    model.generation_config.eos_token_id = None
    model.config.eos_token_id = None
    workload = TINY_TEXT_ONLY if tiny else TEXT_ONLY
    prompts = workload.prompts(seed=7)
    warmup_s, _ = generate_batch(model, token_prompts(99, 4, 16), 4)
    log(f"transformers: loaded in {load_seconds:.1f} s, warm-up call {warmup_s:.1f} s")
    seconds, tokens = generate_batch(model, prompts, workload.new_tokens)
    expected = workload.requests * workload.new_tokens
    log(f"transformers generate_batch: {seconds:.1f} s, {tokens / seconds:,.0f} output tok/s")
    return {
        "meta": run_metadata(device),
        "checkpoint": str(checkpoint),
        "dtype": str(dtype).removeprefix("torch."),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "load_seconds": load_seconds,
        "warmup_call_seconds": warmup_s,
        "workload": vars(workload),
        "seconds": seconds,
        "output_tokens": tokens,
        "all_tokens_generated": tokens == expected,
        "output_tokens_per_s": tokens / seconds,
        "requests_per_s": workload.requests / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    write_json(args.out, run(args.checkpoint, args.tiny))


if __name__ == "__main__":
    main()
