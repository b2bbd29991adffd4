"""Layer numerics against transformers' own building blocks."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from ocula.layers.activation import SiluAndMul
from ocula.layers.norm import RMSNorm
from ocula.layers.rotary import RotaryEmbedding, apply_rotary
from tests.models.test_hf_parity import ROPE_VARIANTS

HEAD_DIM = 16


def rope_config(rope_parameters: dict, max_positions: int = 64) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        max_position_embeddings=max_positions,
        rope_parameters=dict(rope_parameters),
    )


@pytest.mark.parametrize("rope", [*sorted(ROPE_VARIANTS), "default"])
def test_cos_sin_table_equals_transformers(rope: str) -> None:
    params = ROPE_VARIANTS.get(rope, {"rope_type": "default", "rope_theta": 10000.0})
    ours = RotaryEmbedding(rope_config(params), HEAD_DIM)
    theirs = LlamaRotaryEmbedding(rope_config(params))
    # One sequence of every position we serve (the longest transformers keeps unscaled for
    # dynamic NTK): transformers' cos/sin for it must be our table.
    positions = torch.arange(ours.max_positions)
    cos, sin = theirs(torch.zeros(1, dtype=torch.float32), positions[None])
    our_cos, our_sin = ours.lookup(positions, torch.float32)
    torch.testing.assert_close(torch.cat([our_cos, our_cos], -1), cos[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.cat([our_sin, our_sin], -1), sin[0], atol=1e-6, rtol=0)


def test_dynamic_ntk_covers_exactly_max_position_embeddings() -> None:
    ours = RotaryEmbedding(rope_config(ROPE_VARIANTS["dynamic"], max_positions=48), HEAD_DIM)
    assert ours.max_positions == 48 and ours.cos_cache.shape == (48, HEAD_DIM // 2)


def test_unknown_rope_type_is_refused() -> None:
    config = rope_config({"rope_type": "default", "rope_theta": 1.0})
    config.rope_parameters = {"rope_type": "spiral", "rope_theta": 1.0}
    with pytest.raises(ValueError, match="spiral"):
        RotaryEmbedding(config, HEAD_DIM)


def test_apply_rotary_equals_transformers_bitwise() -> None:
    torch.manual_seed(0)
    rope = RotaryEmbedding(rope_config({"rope_type": "default", "rope_theta": 10000.0}), HEAD_DIM)
    positions = torch.tensor([0, 5, 17, 63])
    q = torch.randn(4, 3, HEAD_DIM, dtype=torch.bfloat16)
    cos, sin = rope.lookup(positions, torch.bfloat16)
    full_cos, full_sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    # transformers takes q [batch, heads, seq, dim] and cos [batch, seq, dim]: tokens as batch.
    q_hf, cos_hf, sin_hf = q[:, :, None], full_cos[:, None], full_sin[:, None]
    expected, _ = apply_rotary_pos_emb(q_hf, q_hf, cos_hf, sin_hf, unsqueeze_dim=1)
    assert torch.equal(apply_rotary(q, cos, sin), expected[:, :, 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_with_residual_equals_transformers_bitwise(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x, residual = torch.randn(5, 64, dtype=dtype), torch.randn(5, 64, dtype=dtype)
    weight = (1 + 0.1 * torch.randn(64)).to(dtype)
    theirs = LlamaRMSNorm(64, eps=1e-5).to(dtype)
    ours = RMSNorm(64, eps=1e-5).to(dtype)
    with torch.no_grad():
        theirs.weight.copy_(weight)
        ours.weight.copy_(weight)
        assert torch.equal(ours(x), theirs(x))
        out, new_residual = ours(x, residual)
        assert torch.equal(new_residual, residual + x)
        assert torch.equal(out, theirs(residual + x))


def test_silu_and_mul() -> None:
    x = torch.randn(3, 8)
    expected = torch.nn.functional.silu(x[:, :4]) * x[:, 4:]
    assert torch.equal(SiluAndMul()(x), expected)


def test_the_vit_fc1_kernel_path_declines_off_the_gpu() -> None:
    """On CPU tensors fc1 and its activation stay the layers' own (the ping-pong GEMM is a
    Hopper kernel, tested in tests/kernels/test_pingpong_linear.py)."""
    import torch.nn.functional as F

    from ocula.layers.linear import ColumnParallelLinear
    from ocula.models.intern_vit_linear import MIN_ROWS, fc1_with_table_activation

    fc1 = ColumnParallelLinear(16, 32, True).bfloat16()
    x = torch.zeros(MIN_ROWS, 16, dtype=torch.bfloat16)
    assert fc1_with_table_activation(fc1, x, F.gelu) is None
