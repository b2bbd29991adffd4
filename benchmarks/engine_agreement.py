"""Greedy agreement of the engine as benchmarked (bf16, default kernels) with its fp32 reference.

The reference is the same engine on the same GPU with `--data_type fp32 --attention_backend
reference --disable_cudagraph` and TF32 off: the torch path the CPU runs, in full precision
(the ViT's attention has no switch: on a GPU its Triton kernel runs, in fp32).
bench_engine.py records the benchmarked engine's greedy tokens; this module's `main` then loads
the reference (in its own process, with the GPU to itself) and compares. Both generate greedy
tokens for the same prompts: half text (random token ids, 32 to 256 long), half
one 448 x 448 image plus a question. Random weights give flat next-token distributions, so bf16
rounding flips near-ties more often than with a trained model; the report gives the rates as
measured, where each prompt first diverges, and the reference's log-probability gap between its
choice and the runner-up there (against the median gap over all positions: divergences at
near-ties are rounding, divergences at clear choices would be a bug).

    python -m benchmarks.engine_agreement --checkpoint DIR --compare_with engine.json --out a.json
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import engine_options, log, make_llm, read_json, write_json
from benchmarks.workloads import image_prompt, token_prompts

PROMPTS, TOKENS = 32, 16
TINY_PROMPTS, TINY_TOKENS = 6, 6
REFERENCE_OPTIONS = {
    "data_type": "fp32",
    "attention_backend": "reference",
    "disable_cudagraph": True,
}


def agreement_prompts(tiny: bool) -> list[Any]:
    count = TINY_PROMPTS if tiny else PROMPTS
    texts = count // 2
    lengths = [32 + (224 * i) // max(1, texts - 1) for i in range(texts)]
    prompts: list[Any] = [token_prompts(1000 + i, 1, n)[0] for i, n in enumerate(lengths)]
    prompts += [image_prompt(2000 + i, 24) for i in range(count - texts)]
    return prompts


def greedy_tokens(llm: Any, prompts: list[Any], tiny: bool) -> list[list[int]]:
    return [tokens for tokens, _ in greedy_with_margins(llm, prompts, tiny, margins=False)]


def greedy_with_margins(
    llm: Any, prompts: list[Any], tiny: bool, margins: bool = True
) -> list[tuple[list[int], list[float]]]:
    """Each prompt's greedy tokens and, with `margins`, at every step the log-probability gap
    between the chosen token and the runner-up (how near a tie the choice was)."""
    from ocula import SamplingParams

    count = TINY_TOKENS if tiny else TOKENS
    params = SamplingParams(
        temperature=0, max_new_tokens=count, ignore_eos=True, logprobs=2 if margins else None
    )
    results = []
    for output in llm.generate(prompts, params):
        gaps = []
        for step in output.outputs[0].logprobs or []:
            best = sorted((logprob for _, logprob in step.top_logprobs), reverse=True)
            gaps.append(best[0] - best[1] if len(best) > 1 else float("inf"))
        results.append((output.token_ids, gaps))
    return results


def compare(
    tested: list[list[int]], reference: list[list[int]], margins: list[list[float]] | None = None
) -> dict[str, Any]:
    """Agreement rates and, per prompt, the first position where the tokens differ (None: all
    equal). With the reference's `margins` (see `greedy_with_margins`): the reference's gap at
    each first divergence, beside the median gap over every position, to show whether the
    tested engine departs at near-ties (rounding) or at clear choices (a bug)."""
    divergence: list[int | None] = []
    for got, want in zip(tested, reference, strict=True):
        first = next((i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), None)
        divergence.append(first)
    count = len(divergence)
    length = len(reference[0]) if reference else 0
    prefix = [length if d is None else d for d in divergence]
    result: dict[str, Any] = {
        "prompts": count,
        "tokens_per_prompt": length,
        "all_tokens_agree_rate": sum(d is None for d in divergence) / count,
        "first_token_agree_rate": sum(d != 0 for d in divergence) / count,
        "first_4_tokens_agree_rate": sum(p >= min(4, length) for p in prefix) / count,
        "mean_common_prefix": sum(prefix) / count,
        "first_divergence": divergence,
    }
    if margins is not None:
        at_divergence = [
            gaps[d] for gaps, d in zip(margins, divergence, strict=True) if d is not None
        ]
        every = sorted(gap for gaps in margins for gap in gaps)
        result["reference_gap_at_divergence"] = at_divergence
        result["reference_gap_median_at_divergence"] = median(at_divergence)
        result["reference_gap_median_all_positions"] = median(every)
    return result


def median(values: list[float]) -> float | None:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--engine_args", default="")
    parser.add_argument("--compare_with", type=Path, help="bench_engine.py's JSON")
    parser.add_argument("--time_limit", type=float, help="accepted for run_all; not needed")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    options = engine_options(args.checkpoint, args.engine_args, **REFERENCE_OPTIONS)
    llm = make_llm(options)
    log("agreement: fp32 reference engine loaded")
    generated = greedy_with_margins(llm, agreement_prompts(args.tiny), args.tiny)
    tokens = [tokens for tokens, _ in generated]
    margins = [gaps for _, gaps in generated]
    result: dict[str, Any] = {
        "reference_options": options,
        "reference_tokens": tokens,
        "reference_gaps": margins,
    }
    if args.compare_with is not None:
        found = args.compare_with.is_file()
        tested = read_json(args.compare_with).get("agreement_tokens", {}) if found else {}
        if "tokens" in tested:
            result["agreement"] = compare(tested["tokens"], tokens, margins)
            log(
                f"agreement: {result['agreement']['all_tokens_agree_rate']:.0%} of prompts agree on all tokens"
            )
        else:
            result["agreement"] = {"error": f"no agreement_tokens in {args.compare_with}"}
    write_json(args.out, result)


if __name__ == "__main__":
    main()
