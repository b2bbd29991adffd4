"""Fixtures of the model tests: tiny checkpoints (built once per session) and HF references."""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from ocula.models.hf_config import load_text_config
from ocula.models.loader import load_model
from tests.helpers.tiny_models import internlm2_reference_llama

PROMPTS = (
    "fox",
    "the quick brown fox jumps over",
    "servers stream tokens, caches remember prefixes, and images become embeddings. "
    "Numbers like 12, 345 and 6789 appear too! Why? Because tests need variety.",
)


def load_ocula(checkpoint: Path, **kwargs: Any) -> torch.nn.Module:
    config = load_text_config(checkpoint)
    return load_model(checkpoint, config, torch.float32, "cpu", **kwargs)


def load_reference(checkpoint: Path) -> PreTrainedModel:
    config = json.loads((checkpoint / "config.json").read_text())
    if config["model_type"] == "internlm2":
        return internlm2_reference_llama(checkpoint)
    return AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()


@cache
def _tokenizer(checkpoint: Path) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast.from_pretrained(str(checkpoint))


def encode(checkpoint: Path, text: str) -> list[int]:
    return _tokenizer(checkpoint)(text)["input_ids"]


@torch.no_grad()
def reference_greedy(
    model: PreTrainedModel, prompt_ids: Sequence[int], max_new_tokens: int
) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy continuation and the float32 logits [n, vocab] of each step."""
    input_ids = torch.tensor([list(prompt_ids)])
    out = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    tokens = out.sequences[0, input_ids.shape[1] :].tolist()
    return tokens, torch.cat(out.logits).float()
