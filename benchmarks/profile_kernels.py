"""Which GPU kernels a decode step, a short prefill and the vision encoder spend their time in.

For each case it records device activity with torch.profiler (kernels inside CUDA graphs
included) and reports, per kernel family (GEMM, attention, norm, rotary, KV store, activation,
elementwise, copy, ...) and per kernel name, the device time per call of the case, the number
of launches and the share of the busy time. Cases:
- `decode B`: one `core.step()` of B requests decoding at `--context` tokens (graph replay);
- `prefill N`: a step that prefills N new tokens of one request (eager forward), and the host
  time of the `core.step()` call that launches it;
- `prefill 1 (cached)`: the same prompt again, the prefix cache serving all but its last token;
- `vit T tiles`: the engine's image encoder (the CUDA-graph path up to 16 tiles) on T tiles,
  and the model's eager `encode_images` for comparison (wall time, CUDA events).
A diagnosis tool; BENCHMARKS.md's numbers of record come from run_all.

    python -m benchmarks.profile_kernels --checkpoint DIR [--batches 1,64] [--out kernels.json]
"""

from __future__ import annotations

import argparse
import re
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_engine import DECODE_MAX_NEW_TOKENS
from benchmarks.common import Deadline, engine_options, log, make_llm, sync, time_call, write_json
from benchmarks.engine_driver import add_to_core, finish, step_until_all_sampled
from benchmarks.workloads import token_prompts

# First matching pattern names the family (kernel names are lower-cased first).
FAMILIES = (
    ("memcpy", r"memcpy|memset"),
    ("attention", r"attention|attn|flash|fmha|decode_.*kernel|_fwd_kernel"),
    ("gemm", r"gemm|gemv|cutlass|cublas|nvjet|sm90_xmma|matmul|splitk"),
    ("norm", r"norm"),
    ("rotary", r"rotary|rope"),
    ("kv_store", r"kv_store|store_kv|scatter"),
    ("activation", r"silu|gelu|act_and_mul|swiglu"),
    ("sampling", r"argmax|topk|softmax|sort|multinomial|exponential|philox"),
    ("elementwise", r"elementwise|vectorized|unrolled|reduce|cat|copy"),
)


def family(name: str) -> str:
    lowered = name.lower()
    for label, pattern in FAMILIES:
        if re.search(pattern, lowered):
            return label
    return "other"


def kernel_table(run: Callable[[], Any], calls: int, device: torch.device) -> dict[str, Any]:
    """Device time of `calls` runs of `run`, per call, by family and by kernel name."""
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            run()
        sync(device)
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.profiler.kineto_results.events():
        if "CUDA" not in str(event.device_type()):
            continue
        entry = by_name[event.name()]
        entry[0] += event.duration_ns() / 1e3 / calls
        entry[1] += 1 / calls
    busy = sum(us for us, _ in by_name.values())
    families: dict[str, dict[str, float]] = defaultdict(lambda: {"us": 0.0, "launches": 0.0})
    for name, (us, launches) in by_name.items():
        families[family(name)]["us"] += us
        families[family(name)]["launches"] += launches
    top = sorted(by_name.items(), key=lambda item: -item[1][0])[:20]
    return {
        "busy_us_per_call": busy,
        "launches_per_call": sum(n for _, n in by_name.values()),
        "families": {
            k: {**v, "share": v["us"] / busy if busy else 0.0}
            for k, v in sorted(families.items(), key=lambda item: -item[1]["us"])
        },
        "top_kernels": [
            {"name": name[:120], "us": us, "launches": n, "family": family(name)}
            for name, (us, n) in top
        ],
    }


def report(label: str, table: dict[str, Any], wall_ms: float | None = None) -> None:
    wall = f", wall {wall_ms:.3f} ms" if wall_ms is not None else ""
    log(
        f"{label}: GPU busy {table['busy_us_per_call'] / 1e3:.3f} ms, "
        f"{table['launches_per_call']:.0f} launches{wall}"
    )
    for name, row in table["families"].items():
        log(
            f"    {name:<12} {row['us']:9.1f} us  {row['share']:6.1%}  {row['launches']:6.1f} launches"
        )
    for row in table["top_kernels"][:12]:
        log(f"      {row['us']:9.1f} us  x{row['launches']:<6.1f} {row['name'][:90]}")


def decode_case(llm: Any, batch_size: int, context: int) -> dict[str, Any]:
    core = llm.engine.core
    batch = add_to_core(
        llm.engine, token_prompts(7 + batch_size, batch_size, context), DECODE_MAX_NEW_TOKENS
    )
    try:
        step_until_all_sampled(core, batch, Deadline(None))
        for _ in range(4):
            batch.record(core.step())
        wall = time_call(lambda: batch.record(core.step()), core.runner.device, 2, 16)
        table = kernel_table(lambda: batch.record(core.step()), 8, core.runner.device)
    finally:
        finish(core, batch)
    table["wall_ms"] = min(wall)
    report(f"decode batch {batch_size}", table, table["wall_ms"])
    return table


def prefill_case(llm: Any, length: int) -> list[dict[str, Any]]:
    """One step prefilling a new `length`-token prompt (a fresh prompt each call), and one of a
    prompt the prefix cache holds, so that only its last token is computed."""
    core = llm.engine.core
    seeds = iter(range(10_000, 20_000))
    cached_prompt = token_prompts(991, 1, length)

    def one_prefill(prompt: list[Any]) -> None:
        batch = add_to_core(llm.engine, prompt, 1)
        step_until_all_sampled(core, batch, Deadline(60))
        finish(core, batch)

    prompts = {  # label -> the prompt of each call
        f"prefill {length}": lambda: token_prompts(next(seeds), 1, length),
        "prefill 1 (prefix cached)": lambda: cached_prompt,
    }
    results = []
    for label, prompt in prompts.items():

        def run(prompt: Any = prompt) -> None:
            one_prefill(prompt())

        wall = time_call(run, core.runner.device, 2, 5)
        table = kernel_table(run, 3, core.runner.device)
        table["wall_ms"] = min(wall)  # add, prefill and abort: several engine steps
        table["case"] = label
        table["launch_host_ms"] = min(launch_host_ms(llm, prompt()) for _ in range(5))
        report(label, table, table["wall_ms"])
        log(f"    host time of the step that launches it: {table['launch_host_ms']:.2f} ms")
        results.append(table)
    return results


def launch_host_ms(llm: Any, prompt: list[Any]) -> float:
    """Host time of the `core.step()` that launches a prompt's prefill, the device idle before
    it (with overlap on, that step returns without waiting for its own work)."""
    core = llm.engine.core
    batch = add_to_core(llm.engine, prompt, 1)
    sync(core.runner.device)
    start = time.perf_counter()
    core.step()
    elapsed = (time.perf_counter() - start) * 1e3
    step_until_all_sampled(core, batch, Deadline(60))
    finish(core, batch)
    return elapsed


def vit_case(llm: Any, tiles: int) -> dict[str, Any]:
    runner = llm.engine.core.runner
    model = runner.model
    size = model.config.image_size
    pixels = torch.randn(tiles, 3, size, size, device=runner.device, dtype=runner.dtype)
    encoder = runner.image_encoder.encode_images  # VisionGraphs on CUDA unless disabled
    with torch.inference_mode():
        engine_path = time_call(lambda: encoder(pixels), runner.device, 3, 10)
        eager = time_call(lambda: model.encode_images(pixels), runner.device, 3, 10)
        table = kernel_table(lambda: encoder(pixels), 3, runner.device)
        eager_table = kernel_table(lambda: model.encode_images(pixels), 3, runner.device)
    table["wall_ms"] = min(engine_path)
    table["eager_wall_ms"] = min(eager)
    table["eager"] = eager_table
    table["attention_ms"] = attention_choices(model, tiles, runner.device, runner.dtype)
    report(f"vit {tiles} tiles (engine path)", table, table["wall_ms"])
    report(f"vit {tiles} tiles (eager)", eager_table, table["eager_wall_ms"])
    return table


def attention_choices(model: Any, tiles: int, device: torch.device, dtype: torch.dtype) -> dict:
    """ms of one ViT layer's attention on `tiles` tiles: the Triton kernel and torch's SDPA
    backends (flash, cuDNN, memory-efficient), on strided views as the layer passes them."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ocula.kernels.vit_attention import vit_attention, vit_attention_reference

    vit = model.config.vision_config
    heads, head_dim = vit.num_attention_heads, vit.hidden_size // vit.num_attention_heads
    tokens = (vit.image_size // vit.patch_size) ** 2 + 1
    qkv = torch.randn(tiles, tokens, 3, heads, head_dim, device=device, dtype=dtype)
    q, k, v = qkv.unbind(2)
    scale = head_dim**-0.5
    flops = 4 * tiles * heads * tokens * tokens * head_dim
    results = {}
    candidates: dict[str, Callable[[], Any]] = {"triton": lambda: vit_attention(q, k, v, scale)}
    for name, backend in (
        ("sdpa_flash", SDPBackend.FLASH_ATTENTION),
        ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
        ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION),
    ):

        def run(backend: Any = backend) -> Any:
            with sdpa_kernel(backend):
                return vit_attention_reference(q, k, v, scale)

        candidates[name] = run
    for name, run in candidates.items():
        try:
            best = min(time_call(run, device, 2, 10))
        except RuntimeError as error:  # a backend that does not take these inputs
            results[name] = {"error": str(error)[:200]}
            continue
        results[name] = {"ms": best, "tflops": flops / best / 1e9}
        log(f"    attention {tiles} tiles, {name}: {best:.3f} ms, {flops / best / 1e9:.0f} TFLOP/s")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--prefill", default="330", help="comma-separated prompt lengths")
    parser.add_argument("--tiles", default="1,32")
    parser.add_argument("--engine_args", default="")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    llm = make_llm(engine_options(args.checkpoint, args.engine_args))
    results: dict[str, Any] = {"checkpoint": str(args.checkpoint), "decode": {}, "prefill": []}
    if llm.engine.core.runner.device.type != "cuda":
        raise SystemExit("profile_kernels needs a CUDA device")
    for batch_size in (int(b) for b in args.batches.split(",")):
        results["decode"][batch_size] = decode_case(llm, batch_size, args.context)
    for length in (int(n) for n in args.prefill.split(",") if n):
        results["prefill"] += prefill_case(llm, length)
    if llm.engine.core.runner.image_encoder is not None:
        results["vit"] = {t: vit_case(llm, int(t)) for t in args.tiles.split(",") if t}
    if args.out is not None:
        write_json(args.out, results)


if __name__ == "__main__":
    main()
