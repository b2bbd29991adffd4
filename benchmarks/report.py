"""The Markdown section for BENCHMARKS.md, from run_all's combined results.

Every number comes with the limit or peer it is compared against and the ratio; a part that was
skipped or failed says so in its row instead of disappearing.

    python -m benchmarks.report benchmarks/results/<gpu>-<date>.json   # print it again
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from benchmarks.report_rows import (
    agreement_rows,
    engine_rows,
    offline_rows,
    part_result,
    serving_rows,
)


def _options_line(engine: dict[str, Any]) -> str:
    options = engine.get("options", {})
    model = engine.get("model", {})
    keys = (
        "attention_backend",
        "disable_cudagraph",
        "graph_max_batch_size",
        "mem_fraction",
        "chunked_prefill_size",
        "visual_infer_batch_size",
    )
    shown = ", ".join(f"{k}={options[k]}" for k in keys if k in options)
    resolved = model.get("attention_backend_resolved")
    return f"{shown}; dtype {model.get('dtype')}" + (f", attention {resolved}" if resolved else "")


def _model_line(results: dict[str, Any]) -> str:
    if results.get("tiny"):
        return "Tiny random checkpoints (`--tiny`): the numbers only show that the pipeline runs."
    if results.get("model") == "internvl2_5-8b":
        shape = "InternVL2.5-8B's shape (InternViT-300M-448px + InternLM2.5-7B, original layout)"
    else:
        shape = "InternVL3-8B's shape (InternViT-300M-448px + Qwen2.5-7B)"
    return f"Random bf16 weights of {shape}, real Qwen2 vocabulary, loaded through Ocula's loader."


def markdown(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    hardware, _ = part_result(results, "hardware")
    engine, engine_note = part_result(results, "engine")
    offline, offline_note = part_result(results, "offline")
    serving, serving_note = part_result(results, "serving")
    extra, _ = part_result(results, "internvl2_5")
    agreement, agreement_note = part_result(results, "agreement")
    modified = ", uncommitted changes" if meta.get("ocula_tree_modified") else ""
    lines = [
        f"### {meta.get('device', 'unknown device')}, {meta.get('date', '')[:10]} "
        f"(Ocula {meta.get('ocula_commit')}{modified})",
        "",
        f"`{results.get('command')}`: torch {meta.get('torch')} (CUDA {meta.get('cuda')}), "
        f"triton {meta.get('triton')}, transformers {meta.get('transformers')}. {_model_line(results)}",
        "",
    ]
    if hardware:
        copy, matmul = hardware["copy"], hardware["matmul"]
        lines.append(
            f"Limits measured in this run: device-to-device copy **{copy['bytes_per_s'] / 1e9:,.0f}"
            f" GB/s** ({copy['counting']}, {copy['buffer_bytes'] / 2**30:.3g} GiB buffer); "
            f"{matmul['dtype']} matmul **{matmul['flops_per_s'] / 1e12:,.4g} TFLOP/s** "
            f"({matmul['counting']})."
        )
    if engine:
        lines += ["", f"Engine options: {_options_line(engine)}."]
    rows = engine_rows(engine) + offline_rows(offline) + serving_rows(serving)
    rows += agreement_rows(agreement)
    if extra:
        rows += engine_rows(extra, "InternVL2.5-8B (InternLM2.5-7B): ")
    lines += ["", "| Benchmark | Ocula | Limit or peer | Ratio | Goal |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    notes = [n for n in (engine_note, offline_note, serving_note, agreement_note) if n]
    if notes:
        lines += ["", "Not measured: " + "; ".join(notes) + "."]
    lines += ["", FORMULAS]
    return "\n".join(lines) + "\n"


FORMULAS = (
    "How the limits are counted (benchmarks/accounting.py): decode roofline = (language-model "
    "weights except the input embedding table + K/V of every context token) / copy bandwidth, "
    "ratio = roofline / measured step; prefill and ViT MFU = matmul FLOPs (2mkn; causal "
    "attention 4·layers·heads·head_dim·Σkeys, bidirectional for the ViT) / time / matmul peak; "
    "offline floor = prefill (+ ViT) FLOPs at the matmul peak + 255 decode steps reading "
    "weights and all K/V at the copy bandwidth, ratio = floor / measured time. Decode steps are "
    "timed around the engine core's `step()` (scheduler + forward + sampling); GPU idle = 1 − "
    "profiled GPU busy time per step / unprofiled step time."
)


def main() -> None:
    from benchmarks.common import read_json

    print(markdown(read_json(Path(sys.argv[1]))))


if __name__ == "__main__":
    main()
