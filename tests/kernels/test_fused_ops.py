"""The fused elementwise kernels against their torch references, bit for bit.

RMSNorm, RoPE (alone and fused with the KV store), SiLU-and-mul, the KV store and the embedding
splice, on the `device` fixture (CPU through Triton's interpreter: fp32 and fp16; CUDA natively,
also bf16). Shapes include a non-power-of-two hidden size, block tails and strided views of a
fused projection's output.

Two things are device-specific by nature, and the tests say where:
- RMSNorm's float32 sum of squares is summed in an order of each implementation's own. Rows whose
  sum is exact (multiples of 1/8 here) are bit-identical; on random rows only the variance's last
  bits may differ, which is bounded below.
- SiLU needs exp. On CUDA the kernel calls libdevice's expf, as torch does, and must match
  exactly; the interpreter has only numpy's exp, so on CPU the oracle is torch's formula on numpy's
  exp (every rounding the same, only the exp implementation is fixed to the kernel's).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig

from ocula.kernels.activation import silu_and_mul
from ocula.kernels.kv_store import store_kv
from ocula.kernels.rmsnorm import fused_add_rms_norm, rms_norm
from ocula.kernels.rotary import apply_rotary_inplace
from ocula.kernels.rotary_store import rotate_and_store_kv
from ocula.kernels.splice import splice_rows_
from ocula.layers.activation import silu_and_mul_reference
from ocula.layers.norm import rms_norm_reference
from ocula.layers.rotary import RotaryEmbedding, apply_rotary

EPS = 1e-6


def dtypes(device: torch.device) -> list[torch.dtype]:
    # Triton's interpreter computes bf16 wrongly: bf16 only on the GPU.
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device.type == "cuda" else [])


# Every test runs each dtype and skips those the device cannot check.
each_dtype = pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])


def skip_unsupported(device: torch.device, dtype: torch.dtype) -> None:
    if dtype not in dtypes(device):
        pytest.skip("bf16 runs on CUDA only (the interpreter computes bf16 wrongly)")


def randn(*shape: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)


def eighths(*shape: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> torch.Tensor:
    """Multiples of 1/8 in [-2, 2]: their squares sum exactly in float32 in any order."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(-16, 17, shape, generator=generator) / 8).to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------- RMSNorm


@each_dtype
@pytest.mark.parametrize("hidden", [64, 96, 896])
def test_rms_norm_is_bit_identical_when_the_sum_is_exact(
    device: torch.device, dtype: torch.dtype, hidden: int
) -> None:
    skip_unsupported(device, dtype)
    weight = (1 + 0.1 * randn(hidden, dtype=torch.float32, device=device, seed=1)).to(dtype)
    wide = eighths(5, hidden + 32, dtype=dtype, device=device)
    x = wide[:, :hidden]  # strided rows
    assert torch.equal(rms_norm(x, weight, EPS), rms_norm_reference(x, weight, EPS))
    x3 = eighths(2, 3, hidden, dtype=dtype, device=device, seed=2)
    assert torch.equal(rms_norm(x3, weight, EPS), rms_norm_reference(x3, weight, EPS))
    # A float32 weight promotes the output, as torch's multiply does.
    weight32 = weight.float()
    assert torch.equal(rms_norm(x, weight32, EPS), rms_norm_reference(x, weight32, EPS))


@each_dtype
@pytest.mark.parametrize("hidden", [64, 96])
def test_fused_add_rms_norm_is_bit_identical_in_place(
    device: torch.device, dtype: torch.dtype, hidden: int
) -> None:
    skip_unsupported(device, dtype)
    weight = (1 + 0.1 * randn(hidden, dtype=torch.float32, device=device, seed=1)).to(dtype)
    # Random values: the residual add must round exactly as torch's `x + residual`.
    x, residual = (
        randn(7, hidden, dtype=dtype, device=device),
        randn(7, hidden, dtype=dtype, device=device, seed=3),
    )
    expected_sum = x + residual
    out, new_residual = fused_add_rms_norm(x.clone(), residual, weight, EPS)
    assert new_residual.data_ptr() == residual.data_ptr()
    assert torch.equal(new_residual, expected_sum)
    # Exactly summable rows: the normalized output must be bit-identical too.
    x, residual = (
        eighths(7, hidden, dtype=dtype, device=device),
        eighths(7, hidden, dtype=dtype, device=device, seed=4),
    )
    expected_sum = x + residual
    x_ptr = x.data_ptr()
    out, new_residual = fused_add_rms_norm(x, residual, weight, EPS)
    assert out.data_ptr() == x_ptr  # written in place
    assert torch.equal(new_residual, expected_sum)
    assert torch.equal(out, rms_norm_reference(expected_sum, weight, EPS))


@each_dtype
@pytest.mark.parametrize("hidden", [96, 896])
def test_rms_norm_on_random_rows_differs_only_by_the_sum_order(
    device: torch.device, dtype: torch.dtype, hidden: int
) -> None:
    skip_unsupported(device, dtype)
    weight = (1 + 0.1 * randn(hidden, dtype=torch.float32, device=device, seed=1)).to(dtype)
    x = randn(9, hidden, dtype=dtype, device=device, seed=5)
    out = rms_norm(x, weight, EPS)
    expected = rms_norm_reference(x, weight, EPS)
    # Any order of summing n positive float32 terms stays within (n - 1) * 2^-24 of the exact sum
    # (relative), so two orders differ by at most twice that, and rsqrt halves it. Add one unit in
    # the last place of the output dtype for a rounding that the different value can flip.
    rtol = (hidden - 1) * 2.0**-24 + torch.finfo(dtype).eps
    torch.testing.assert_close(out.float(), expected.float(), rtol=rtol, atol=0.0)
    # The kernel's result for a row does not depend on the rest of the batch.
    assert torch.equal(rms_norm(x[4:5], weight, EPS), out[4:5])


def test_fused_add_rms_norm_refuses_aliased_inputs(device: torch.device) -> None:
    x = randn(2, 64, dtype=torch.float32, device=device)
    with pytest.raises(ValueError, match="different tensors"):
        fused_add_rms_norm(x, x, torch.ones(64, device=device), EPS)


# ---------------------------------------------------------------------------------- RoPE


def fused_qkv(
    tokens: int,
    q_heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    return randn(tokens, (q_heads + 2 * kv_heads) * head_dim, dtype=dtype, device=device, seed=7)


def split_heads(
    qkv: torch.Tensor, q_heads: int, kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Strided [T, heads, head_dim] views of a fused projection output, as the model has them."""
    q, k, v = qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    tokens = qkv.shape[0]
    return (
        q.view(tokens, q_heads, head_dim),
        k.view(tokens, kv_heads, head_dim),
        v.view(tokens, kv_heads, head_dim),
    )


def rotary_tables(q_heads: int, head_dim: int, device: torch.device) -> RotaryEmbedding:
    """Default RoPE over 300 positions."""
    config = LlamaConfig(
        hidden_size=q_heads * head_dim,
        num_attention_heads=q_heads,
        max_position_embeddings=300,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    return RotaryEmbedding(config, head_dim).to(device)


@each_dtype
@pytest.mark.parametrize(("q_heads", "kv_heads", "head_dim"), [(4, 2, 16), (6, 3, 24), (2, 2, 64)])
def test_rotary_in_place_is_bit_identical(
    device: torch.device, dtype: torch.dtype, q_heads: int, kv_heads: int, head_dim: int
) -> None:
    skip_unsupported(device, dtype)
    rotary = rotary_tables(q_heads, head_dim, device)
    positions = torch.tensor([5, 0, 299, 17, 17, 123, 1], device=device)  # out of order, repeats
    qkv = fused_qkv(len(positions), q_heads, kv_heads, head_dim, dtype, device)
    q, k, v = split_heads(qkv, q_heads, kv_heads, head_dim)
    cos, sin = rotary.lookup(positions, dtype)
    expected = torch.cat(
        [apply_rotary(q, cos, sin).flatten(1), apply_rotary(k, cos, sin).flatten(1), v.flatten(1)],
        dim=1,
    )
    apply_rotary_inplace(q, k, positions, rotary.cos_cache, rotary.sin_cache)
    assert torch.equal(qkv, expected)  # q and k rotated in place, v untouched


@each_dtype
@pytest.mark.parametrize(("q_heads", "kv_heads", "head_dim"), [(4, 2, 16), (6, 3, 24)])
def test_rotate_and_store_kv_equals_rotary_then_store(
    device: torch.device, dtype: torch.dtype, q_heads: int, kv_heads: int, head_dim: int
) -> None:
    skip_unsupported(device, dtype)
    rotary = rotary_tables(q_heads, head_dim, device)
    positions = torch.tensor([5, 0, 299, 17, 17, 123, 1], device=device)
    slots = torch.tensor([3, 0, 11, 7, 0, 20, 1], device=device)  # 0: the shared scratch slot
    qkv = fused_qkv(len(positions), q_heads, kv_heads, head_dim, dtype, device)
    before = qkv.clone()
    q, k, v = split_heads(qkv, q_heads, kv_heads, head_dim)
    cos, sin = rotary.lookup(positions, dtype)
    rotated_q, rotated_k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    real = slots != 0  # which token lands in the scratch slot is unspecified
    for cache_dtype in [dtype, torch.float16]:
        k_cache = randn(24, kv_heads, head_dim, dtype=cache_dtype, device=device, seed=12)
        v_cache = randn(24, kv_heads, head_dim, dtype=cache_dtype, device=device, seed=13)
        expected_k, expected_v = k_cache.clone(), v_cache.clone()
        expected_k[slots[real]] = rotated_k[real].to(cache_dtype)
        expected_v[slots[real]] = v[real].to(cache_dtype)
        qkv.copy_(before)
        rotate_and_store_kv(
            q, k, v, positions, rotary.cos_cache, rotary.sin_cache, k_cache, v_cache, slots
        )
        assert torch.equal(q, rotated_q)  # in place
        assert torch.equal(qkv[:, q_heads * head_dim :], before[:, q_heads * head_dim :])
        assert torch.equal(k_cache[1:], expected_k[1:]) and torch.equal(v_cache[1:], expected_v[1:])


# ---------------------------------------------------------------------------------- SiLU


def silu_and_mul_oracle(x: torch.Tensor) -> torch.Tensor:
    """The torch reference on CUDA; on CPU the same formula with the interpreter's (numpy) exp."""
    if x.is_cuda:
        return silu_and_mul_reference(x)
    gate, up = x.float().chunk(2, dim=-1)
    exp = torch.from_numpy(np.exp(-gate.numpy()))
    return (gate / (1 + exp)).to(x.dtype) * up.to(x.dtype)


@each_dtype
@pytest.mark.parametrize("width", [96, 1100])
def test_silu_and_mul_is_bit_identical(
    device: torch.device, dtype: torch.dtype, width: int
) -> None:
    skip_unsupported(device, dtype)
    wide = 3 * randn(6, 2 * width + 8, dtype=dtype, device=device, seed=9)
    x = wide[:, : 2 * width]  # strided rows
    assert torch.equal(silu_and_mul(x), silu_and_mul_oracle(x))
    x3 = x.reshape(2, 3, 2 * width)
    out = silu_and_mul(x3)
    assert out.shape == (2, 3, width) and torch.equal(out, silu_and_mul_oracle(x3))


# ---------------------------------------------------------------------------------- KV store


@each_dtype
@pytest.mark.parametrize(("kv_heads", "head_dim"), [(2, 16), (3, 24)])
def test_store_kv_writes_strided_views_at_slots(
    device: torch.device, dtype: torch.dtype, kv_heads: int, head_dim: int
) -> None:
    skip_unsupported(device, dtype)
    tokens, num_slots = 9, 40
    qkv = fused_qkv(tokens, 4, kv_heads, head_dim, dtype, device)
    _, k, v = split_heads(qkv, 4, kv_heads, head_dim)
    generator = torch.Generator().manual_seed(11)
    slots = torch.randperm(num_slots, generator=generator)[:tokens].to(device)
    for cache_dtype in {dtype, torch.float16}:
        k_cache = randn(num_slots, kv_heads, head_dim, dtype=cache_dtype, device=device, seed=12)
        v_cache = randn(num_slots, kv_heads, head_dim, dtype=cache_dtype, device=device, seed=13)
        expected_k, expected_v = k_cache.clone(), v_cache.clone()
        expected_k[slots] = k.to(cache_dtype)
        expected_v[slots] = v.to(cache_dtype)
        store_kv(k, v, k_cache, v_cache, slots)
        assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


# ---------------------------------------------------------------------------------- splice


@each_dtype
def test_splice_rows_copies_embeddings_in_place(device: torch.device, dtype: torch.dtype) -> None:
    skip_unsupported(device, dtype)
    hidden = randn(12, 96, dtype=dtype, device=device, seed=14)
    rows = torch.tensor([7, 2, 3, 11], device=device)
    for embeds_dtype in {dtype, torch.float32}:
        embeds = randn(4, 96, dtype=embeds_dtype, device=device, seed=15)
        expected = hidden.index_copy(0, rows, embeds.to(dtype))
        target = hidden.clone()
        assert splice_rows_(target, rows, embeds) is target
        assert torch.equal(target, expected)


def test_splice_rows_skips_negative_rows(device: torch.device) -> None:
    hidden = randn(6, 40, dtype=torch.float32, device=device, seed=16)
    embeds = randn(4, 40, dtype=torch.float32, device=device, seed=17)
    rows = torch.tensor([4, -1, 0, -1], device=device)  # a graph's padded splice buffer
    expected = hidden.clone()
    expected[4], expected[0] = embeds[0], embeds[2]
    assert torch.equal(splice_rows_(hidden.clone(), rows, embeds), expected)
