"""Greedy tokens and logits of Ocula's models equal transformers' on tiny random checkpoints."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.helpers.forward import PagedRunner
from tests.models.conftest import PROMPTS, encode, load_ocula, load_reference, reference_greedy

NEW_TOKENS = 8
# fp32 on CPU: the two implementations differ only in summation order (fused projections,
# paged attention), a few ulps of logits of magnitude ~5.
LOGITS_TOLERANCE = {"atol": 5e-5, "rtol": 1e-5}


def assert_matches_reference(checkpoint: Any, prompts: tuple[str, ...] = PROMPTS) -> None:
    model = load_ocula(checkpoint)
    reference = load_reference(checkpoint)
    runner = PagedRunner(model)
    for row, text in enumerate(prompts):
        prompt_ids = encode(checkpoint, text)
        expected_tokens, expected_logits = reference_greedy(reference, prompt_ids, NEW_TOKENS)
        tokens, logits = runner.generate_greedy(row, prompt_ids, NEW_TOKENS)
        assert tokens == expected_tokens, f"prompt {row} ({len(prompt_ids)} tokens)"
        torch.testing.assert_close(logits, expected_logits, **LOGITS_TOLERANCE)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "internlm2"])
def test_greedy_matches_transformers(tiny_checkpoint: Any, arch: str) -> None:
    assert_matches_reference(tiny_checkpoint(arch))


def test_qwen2_qkv_bias_is_used(tiny_checkpoint: Any) -> None:
    model = load_ocula(tiny_checkpoint("qwen2"))
    attention = model.model.layers[0].self_attn
    assert attention.qkv_proj.bias is not None and attention.qkv_proj.bias.abs().sum() > 0
    assert attention.o_proj.bias is None


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [
        ("llama", {"attention_bias": True, "mlp_bias": True}),
        ("llama", {"tie_word_embeddings": True}),
        ("internlm2", {"bias": True, "tie_word_embeddings": True}),
        ("llama", {"head_dim": 32}),
    ],
    ids=["llama-biases", "llama-tied", "internlm2-bias-tied", "llama-head-dim"],
)
def test_config_variants_match_transformers(
    tiny_checkpoint: Any, arch: str, overrides: dict
) -> None:
    assert_matches_reference(tiny_checkpoint(arch, **overrides))


def test_tied_embeddings_share_one_parameter(tiny_checkpoint: Any) -> None:
    model = load_ocula(tiny_checkpoint("llama", tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight


ROPE_VARIANTS = {
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
        "rope_theta": 500000.0,
    },
    "yarn": {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 128,
        "rope_theta": 10000.0,
    },
    # Dynamic NTK within max_position_embeddings, where transformers keeps the base frequencies.
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
}


@pytest.mark.parametrize("rope", sorted(ROPE_VARIANTS))
def test_rope_scaling_matches_transformers(tiny_checkpoint: Any, rope: str) -> None:
    overrides = {"rope_parameters": ROPE_VARIANTS[rope], "max_position_embeddings": 64}
    assert_matches_reference(tiny_checkpoint("llama", **overrides))


@pytest.mark.parametrize("kind", ["linear", "dynamic"])
def test_internlm2_rope_scaling_matches_transformers(tiny_checkpoint: Any, kind: str) -> None:
    overrides = {
        "rope_scaling": {"type": kind, "factor": 2.0},
        "rope_theta": 50000,
        "max_position_embeddings": 64,
    }
    assert_matches_reference(tiny_checkpoint("internlm2", **overrides))


def test_mistral_sliding_window_matches_transformers(tiny_checkpoint: Any) -> None:
    checkpoint = tiny_checkpoint("mistral", sliding_window=5)
    model = load_ocula(checkpoint)
    assert all(layer.self_attn.attn.sliding_window == 5 for layer in model.model.layers)
    assert_matches_reference(checkpoint, PROMPTS[1:])  # prompts longer than the window


def test_qwen2_sliding_window_on_upper_layers_matches_transformers(tiny_checkpoint: Any) -> None:
    checkpoint = tiny_checkpoint(
        "qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1
    )
    model = load_ocula(checkpoint)
    assert [layer.self_attn.attn.sliding_window for layer in model.model.layers] == [None, 4]
    assert_matches_reference(checkpoint, PROMPTS[1:])
