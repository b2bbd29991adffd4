"""Rows of the benchmark report's table, one builder per part (engine, offline, serving,
agreement). A row is (benchmark, Ocula, limit or peer, ratio, goal); a measurement that was
skipped or failed gets a row that says why instead of numbers.
"""

from __future__ import annotations

from typing import Any

Row = tuple[str, str, str, str, str]  # benchmark, Ocula, limit or peer, ratio, goal


def _f(value: Any, spec: str, suffix: str = "") -> str:
    if value is None:
        return "n/a"
    return f"{format(value, spec)}{suffix}"


def part_result(results: dict[str, Any], name: str) -> tuple[dict[str, Any], str]:
    """(the part's result, "" or a note saying why there is none)."""
    record = results.get("parts", {}).get(name, {})
    result = record.get("result")
    status = record.get("status", "not run")
    if result is None:
        return {}, f"({name}: {status})"
    return result, "" if status == "ok" else f"({name}: {status}, so some numbers are missing)"


def _sub(part: dict[str, Any], key: str) -> dict[str, Any]:
    value = part.get(key, {})
    return (
        value if isinstance(value, dict) and "error" not in value and "skipped" not in value else {}
    )


def _reason(value: dict[str, Any]) -> str:
    """Why a measurement has no numbers: its error or skip note."""
    return str(value.get("error") or value.get("skipped") or "not run")


def _missing(part: dict[str, Any], key: str) -> str:
    return _reason(part.get(key, {}))


def _embedding_note(decode: dict[str, Any]) -> str:
    """The ratio when the whole embedding table is counted as read, as some reports do."""
    ratio = decode.get("roofline_ratio_counting_embedding_table")
    return f"ratio {_f(ratio, '.3f')} counting the embedding table"


def idle_rows(engine: dict[str, Any], label: str) -> list[Row]:
    idle = engine.get("gpu_idle")
    if not isinstance(idle, dict):
        return []
    title = f"{label}GPU idle between decode steps"
    if "idle_fraction" not in idle:
        return [(title, _reason(idle), "", "", "≤ 5%")]
    batch = idle.get("decode", {}).get("batch")
    note = f" (suspect: {idle['suspect']})" if idle.get("suspect") else ""
    return [
        (
            f"{title}, batch {batch}",
            f"{idle['idle_fraction']:.1%} of the step{note}",
            f"GPU busy {idle['gpu_busy_ms_per_step']:.2f} ms of a {idle['step_ms_unprofiled']:.2f} "
            "ms step",
            f"{idle['idle_fraction_in_trace']:.1%} inside the profiled steps",
            "≤ 5%",
        )
    ]


def engine_rows(engine: dict[str, Any], label: str = "") -> list[Row]:
    rows: list[Row] = []
    for batch, d in engine.get("decode", {}).items():
        if "ms_per_step" not in d:
            rows.append((f"{label}Decode, batch {batch}", _reason(d), "", "", ""))
            continue
        goal = "≥ 0.85" if batch == "1" else ""
        rows.append(
            (
                f"{label}Decode, batch {batch}, {d['context']}-token context",
                f"{d['ms_per_step']:.2f} ms/step ({d['output_tokens_per_s']:,.0f} tok/s)",
                f"roofline {d['roofline_ms']:.2f} ms ({_embedding_note(d)})",
                f"{d['roofline_ratio']:.3f}",
                goal,
            )
        )
    rows += idle_rows(engine, label)
    prefill = _sub(engine, "prefill")
    if prefill:
        rows.append(
            (
                f"{label}Prefill, {prefill['tokens']:,} tokens",
                f"{prefill['best_ms']:.1f} ms",
                f"{prefill['ideal_ms_at_peak']:.1f} ms at matmul peak",
                f"MFU {prefill['mfu']:.3f}",
                "≥ 0.65",
            )
        )
    elif "prefill" in engine:
        rows.append((f"{label}Prefill", _missing(engine, "prefill"), "", "", ""))
    if isinstance(engine.get("vit"), dict):
        rows.append((f"{label}ViT", _reason(engine["vit"]), "", "", ""))
    for vit in engine.get("vit", []) if isinstance(engine.get("vit"), list) else []:
        goal = "≤ 4 ms" if vit["tiles"] == 1 else "≥ 0.70"
        ratio = f"MFU {vit['mfu']:.3f}"
        if "mfu_sustained" in vit:  # both under the power limit (hardware.py)
            ratio += f"; sustained {vit['sustained_ms']:.2f} ms, {vit['mfu_sustained']:.3f}"
        rows.append(
            (
                f"{label}ViT (InternViT-300M + projector), {vit['tiles']} tile(s)",
                f"{vit['best_ms']:.2f} ms",
                "",
                ratio,
                goal,
            )
        )
    return rows


def _positions(divergence: list[int | None]) -> str:
    positions = sorted(d for d in divergence if d is not None)
    return ", ".join(map(str, positions)) if positions else "none"


def _gaps(agreement: dict[str, Any]) -> str:
    at, every = (
        agreement.get(f"reference_gap_median_{k}") for k in ("at_divergence", "all_positions")
    )
    if at is None or every is None:
        return ""
    return (
        f"; fp32 log-prob gap to the runner-up there, median {at:.3g} (all positions {every:.3g})"
    )


def agreement_rows(part: dict[str, Any]) -> list[Row]:
    agreement = _sub(part, "agreement")
    rows: list[Row] = []
    if agreement:
        rows.append(
            (
                f"Greedy agreement bf16 vs fp32 reference ({agreement['prompts']} prompts × "
                f"{agreement['tokens_per_prompt']} tokens)",
                f"all tokens: {agreement['all_tokens_agree_rate']:.0%}; first token: "
                f"{agreement['first_token_agree_rate']:.0%}; first 4: "
                f"{agreement['first_4_tokens_agree_rate']:.0%}",
                f"diverging prompts split at {_positions(agreement['first_divergence'])}"
                + _gaps(agreement),
                f"mean common prefix {agreement['mean_common_prefix']:.1f}",
                "most prompts agree on the first tokens",
            )
        )
    return rows


def offline_rows(offline: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    if not offline:
        return rows
    for key in ("multimodal", "text_only"):
        run = _sub(offline, key)
        if not run:
            rows.append((f"Offline {key}", _missing(offline, key), "", "", ""))
            continue
        w = run["workload"]
        title = f"{run['mean_prompt_tokens']:.0f}-token prompts"
        title += ", one 448² image each" if w["multimodal"] else ""
        done = (
            ""
            if run["finished"]
            else f" (stopped at the deadline: {run['completed_requests']} done)"
        )
        rows.append(
            (
                f"Offline {key}: {w['requests']} × ({title}) → {w['new_tokens']} tokens",
                f"{run['seconds']:.2f} s, {run['output_tokens_per_s']:,.0f} tok/s, "
                f"{run['requests_per_s']:.1f} req/s{done}",
                f"floor {run['floor']['floor_s']:.2f} s",
                f"{run['ratio_to_floor']:.3f}",
                "≥ 0.5" if key == "text_only" else "",
            )
        )
    peer = offline.get("transformers", {})
    text = offline.get("text_only", {})
    if "seconds" in peer:
        speedup = text.get("speedup_vs_transformers")
        rows.append(
            (
                "Offline text_only vs transformers `generate_batch` (same weights)",
                f"{text.get('seconds', float('nan')):.2f} s",
                f"{peer['seconds']:.1f} s, {peer['output_tokens_per_s']:,.0f} tok/s, "
                f"{peer['requests_per_s']:.2f} req/s",
                f"{_f(speedup, '.1f', '×')}",
                "≥ 10×",
            )
        )
    elif "seconds_at_least" in peer:
        bound = text.get("speedup_vs_transformers_at_least")
        rows.append(
            (
                "Offline text_only vs transformers `generate_batch` (same weights)",
                f"{text.get('seconds', float('nan')):.2f} s",
                f"transformers stopped unfinished after {peer['seconds_at_least']:.0f} s",
                f"≥ {_f(bound, '.1f', '×')}",
                "≥ 10×",
            )
        )
    elif peer:
        rows.append(("transformers `generate_batch`", _reason(peer), "", "", ""))
    return rows


def serving_rows(serving: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    idle = _sub(serving, "idle_ttft")
    if idle:
        miss = idle["miss"]["p50_ms"]
        rows.append(
            ("Idle TTFT, 1 image + ~64 tokens, new image", f"{miss:.1f} ms", "", "", "≤ 35 ms")
        )
        for case, text in (
            ("image_cached", "image cached, new text before it (ViT skipped)"),
            ("image_prefix_cached", "image cached, new question after it (ViT and its KV reused)"),
            ("prompt_cached", "same prompt again"),
        ):
            c = idle.get(case)
            if c is None:  # results from before the case existed
                continue
            goal = "≤ 0.40" if case.startswith("image") else ""
            rows.append(
                (
                    f"Idle TTFT, {text}",
                    f"{c['p50_ms']:.1f} ms",
                    f"miss {miss:.1f} ms",
                    f"{c['ratio_to_miss']:.2f}",
                    goal,
                )
            )
    elif "idle_ttft" in serving:
        rows.append(("Idle TTFT", _missing(serving, "idle_ttft"), "", "", ""))
    new_tokens = serving.get("settings", {}).get("new_tokens")
    for rate, r in serving.get("rates", {}).items():
        if "ttft_p50_ms" not in r:
            rows.append((f"Serving at {rate} req/s", _reason(r), "", "", ""))
            continue
        rows.append(
            (
                f"Serving at {rate} req/s (image + ~64 tokens → {new_tokens})",
                f"TTFT p50/p99 {_f(r['ttft_p50_ms'], '.0f')}/{_f(r['ttft_p99_ms'], '.0f')} ms; "
                f"TPOT p50/p99 {_f(r['tpot_p50_ms'], '.1f')}/{_f(r['tpot_p99_ms'], '.1f')} ms",
                f"{r['completed']}/{r['requests']} completed, {r['output_tokens_per_s']:,.0f} tok/s",
                "",
                "",
            )
        )
    return rows
