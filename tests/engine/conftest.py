"""Fixtures of the engine tests: tiny checkpoints and transformers' greedy reference."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers.tiny_models import internlm2_reference_llama

PROMPTS = (
    "fox",
    "the quick brown fox jumps over",
    "servers stream tokens, caches remember prefixes, and images become embeddings.",
    "Numbers like 12, 345 and 6789 appear too! Why?",
)


@torch.no_grad()
def reference_continuations(
    checkpoint: Path, prompts: Sequence[str], max_new_tokens: int
) -> list[list[int]]:
    """transformers' greedy continuation of each prompt, exactly `max_new_tokens` long."""
    config = json.loads((checkpoint / "config.json").read_text())
    if config["model_type"] == "internlm2":
        model = internlm2_reference_llama(checkpoint)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    results = []
    for prompt in prompts:
        input_ids = torch.tensor([tokenizer.encode(prompt)])
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
        )
        results.append(out[0, input_ids.shape[1] :].tolist())
    return results
