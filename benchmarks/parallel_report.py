"""The Markdown section for BENCHMARKS.md from bench_parallel.py's results: one row per layout.

A layout or a part that was skipped or failed says so in its cell instead of disappearing.

    python -m benchmarks.bench_parallel --report benchmarks/results/parallel-<gpu>-<date>.json
"""

from __future__ import annotations

from typing import Any

HEADER = (
    "| Layout (LLM tp; ViT dp × tp) | Tokens vs tp=1 | Decode ms/step (tp=1 ÷ this) "
    "| ViT images/s, encode stage | ViT batch: time to all first tokens | Offline multimodal "
    "| Load |"
)
NOTES = (
    "How each number is taken (benchmarks/parallel_layout.py). Every layout runs in a fresh "
    "process that is rank 0 and starts the other ranks as the server does; the engine's own "
    "defaults apart from the options above. *Tokens*: greedy, {tokens} new tokens on each of "
    "{prompts} prompts (half random-id text of 32-256 tokens, half one 448² image + a question), "
    "all in one batch; 'equal' = every token equal to tp=1's, 'first token' = the first token "
    "equal, 'prefix' = mean length of the common prefix; random weights give flat next-token "
    "distributions, so bf16 rounding flips near-ties often. *Decode*: wall time of the engine "
    "core's `step()` at batch {batch} with {context}-token prompts, after every prefill and a "
    "few warm-up steps. *ViT images/s*: {vit} requests of one distinct 448² image (one tile) "
    "and a short question, max_new_tokens 1, all added at once after a warm-up batch of the "
    "same shape; images / summed wall time of the vision-encoder stage on rank 0 (GPU "
    "synchronized before and after: the ViT forwards in batches of visual_infer_batch_size, "
    "plus the broadcasts of the embeddings from each ViT group to every rank). It leaves out "
    "JPEG decoding and tiling (CPU, rank 0) and the pixels' trip in the step plan; the next "
    "column is the whole batch from its first step to its last first token (LLM prefill "
    "included), which those costs and the LLM's prefill dominate. *Offline*: `LLM`-style "
    "add_request/step of every request at once, greedy, ignore_eos, timed from the first "
    "add_request (image decoding included) after a short warm-up."
)


def _ok(record: dict[str, Any], key: str) -> dict[str, Any] | None:
    value = record.get("result", {}).get(key)
    if isinstance(value, dict) and "error" not in value and "skipped" not in value:
        return value
    return None


def _why(record: dict[str, Any], key: str) -> str:
    if "result" not in record:
        return record.get("status", "not run")
    value = record["result"].get(key)
    if isinstance(value, dict):
        return str(value.get("error") or value.get("skipped"))
    return str(record["result"].get("error") or "not measured (time limit)")


def _label(layout: dict[str, int]) -> str:
    return f"tp={layout['tp']}; ViT {layout['visual_dp']} × {layout['visual_tp']}"


def _tokens_cell(record: dict[str, Any], is_reference: bool) -> str:
    if is_reference:
        return "reference" if isinstance(record.get("result", {}).get("tokens"), list) else "—"
    agreement = record.get("agreement")
    if not agreement:
        return _why(record, "tokens")
    if "error" in agreement:
        return agreement["error"]
    n, length = agreement["prompts"], agreement["tokens_per_prompt"]
    equal = round(agreement["all_tokens_agree_rate"] * n)
    first = round(agreement["first_token_agree_rate"] * n)
    prefix = agreement["mean_common_prefix"]
    return f"{equal}/{n} equal; first token {first}/{n}; prefix {prefix:.1f}/{length}"


def _row(record: dict[str, Any], reference: dict[str, Any], is_reference: bool) -> list[str]:
    if "result" not in record:  # skipped, or failed before writing anything
        return [_label(record["layout"]), record.get("status", "not run"), *["—"] * 5]
    decode, vit, offline = (_ok(record, k) for k in ("decode", "vit", "offline"))
    base = _ok(reference, "decode")
    if decode:
        speedup = ""
        if base and not is_reference:
            speedup = f" ({base['ms_per_step'] / decode['ms_per_step']:.2f}×)"
        decode_cell = f"{decode['ms_per_step']:.2f}{speedup}"
    else:
        decode_cell = _why(record, "decode")
    if vit and vit.get("images_per_s"):
        vit_cell = (
            f"{vit['images_per_s']:,.0f} ({vit['encode_seconds'] * 1e3:.0f} ms for {vit['images']})"
        )
        ttft_cell = f"{vit['batch_ttft_seconds'] * 1e3:,.0f} ms ({vit['steps']} step(s))"
    else:
        vit_cell = ttft_cell = _why(record, "vit")
    if offline:
        partial = "" if offline["finished"] else ", stopped at the time limit"
        offline_cell = (
            f"{offline['output_tokens_per_s']:,.0f} tok/s, {offline['seconds']:.2f} s "
            f"({offline['completed_requests']}/{offline['requests']} requests{partial})"
        )
    elif "offline" in record.get("result", {}):
        offline_cell = _why(record, "offline")
    else:
        offline_cell = "not run"
    load = record.get("result", {}).get("load_seconds")
    load_cell = f"{load:.0f} s" if load is not None else record.get("status", "")
    return [
        _label(record["layout"]),
        _tokens_cell(record, is_reference),
        decode_cell,
        vit_cell,
        ttft_cell,
        offline_cell,
        load_cell,
    ]


def _options_line(results: dict[str, Any]) -> str:
    for record in results.get("layouts", {}).values():
        options = record.get("result", {}).get("options")
        if options:
            keys = (
                "data_type",
                "attention_backend",
                "disable_cudagraph",
                "mem_fraction",
                "chunked_prefill_size",
                "visual_infer_batch_size",
            )
            return ", ".join(f"{k}={options[k]}" for k in keys if k in options)
    return "unknown (no layout started)"


def _sizes(results: dict[str, Any]) -> dict[str, Any]:
    tiny = results.get("tiny")
    return {
        "tokens": 6 if tiny else 16,
        "prompts": 6 if tiny else 32,
        "batch": 4 if tiny else 64,
        "context": 64 if tiny else 1024,
        "vit": 8 if tiny else 64,
    }


def markdown(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    modified = ", uncommitted changes" if meta.get("ocula_tree_modified") else ""
    model = (
        "Tiny random checkpoint (`--tiny`): the numbers only show that the pipeline runs."
        if results.get("tiny")
        else "Random bf16 weights of InternVL3-8B's shape (InternViT-300M-448px + Qwen2.5-7B)."
    )
    layouts = results.get("layouts", {})
    reference = layouts.get("tp1-vit1x1", {})
    workload = next(
        (
            r["result"]["offline"]["workload"]
            for r in layouts.values()
            if _ok(r, "offline") is not None
        ),
        None,
    )
    lines = [
        f"### Parallelism: {results.get('ranks')} × {meta.get('device', 'unknown device')}, "
        f"{meta.get('date', '')[:10]} (Ocula {meta.get('ocula_commit')}{modified})",
        "",
        f"`{results.get('command')}`: torch {meta.get('torch')} (CUDA {meta.get('cuda')}), "
        f"triton {meta.get('triton')}. {model} Engine options: {_options_line(results)}.",
        "",
        HEADER,
        "|---|---|---|---|---|---|---|",
    ]
    for name, record in layouts.items():
        row = _row(record, reference, name == "tp1-vit1x1")
        lines.append("| " + " | ".join(row) + " |")
    if workload:
        lines += [
            "",
            f"Offline workload: {workload['requests']} requests × (one 448² image + "
            f"{workload['prompt_tokens']} words) → {workload['new_tokens']} tokens.",
        ]
    divergences = [
        f"{_label(r['layout'])}: {r['agreement']['first_divergence']}"
        for r in layouts.values()
        if "first_divergence" in r.get("agreement", {})
    ]
    if divergences:
        lines += ["", "First divergence from tp=1 per prompt (None: all tokens equal):", ""]
        lines += [f"- {line}" for line in divergences]
    lines += ["", NOTES.format(**_sizes(results))]
    return "\n".join(lines) + "\n"
