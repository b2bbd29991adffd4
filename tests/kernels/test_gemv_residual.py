"""The RMSNorms folded into the batch-1 GEMVs (`ocula.kernels.gemv_residual`) against the
unfused kernels they replace: GEMV, fused residual add + RMSNorm, GEMV.

The one thing the fold changes is the order of the float32 sum of squares (summed in pieces).
So the bit-for-bit tests use rows whose sums of squares are exact in float32 (multiples of 1/4
no larger than 2 in magnitude: every partial sum is a multiple of 1/16 below 2^20), where every
order gives the same sum; the pieces themselves are checked against a float64 sum.
"""

from __future__ import annotations

import pytest
import torch

from ocula.kernels.gemv import RowNorm, gemv, gemv_config
from ocula.kernels.gemv_residual import (
    gemv_add_residual,
    normed_gemv,
    normed_gemv_silu_and_mul,
)
from ocula.kernels.gemv_silu import gemv_silu_and_mul
from ocula.kernels.rmsnorm import fused_add_rms_norm, rms_norm

EPS = 1e-6


def dtypes(device: torch.device) -> list[torch.dtype]:
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device.type == "cuda" else [])


def quarters(*shape: int, generator: torch.Generator) -> torch.Tensor:
    """Multiples of 1/4 in [-2, 2]: exact in every dtype, with exact float32 sums of squares."""
    return torch.randint(-8, 9, shape, generator=generator).float() / 4


def skip_bf16_off_cuda(device: torch.device, dtype: torch.dtype) -> None:
    if dtype not in dtypes(device):
        pytest.skip("bf16 runs on CUDA only (the interpreter computes bf16 wrongly)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "features,depth,config",
    [(64, 512, None), (70, 300, None), (40, 2048, None), (40, 2048, (16, 1024, 8))],
)  # even tiles; tails; the widest tuned tile (gemv.TUNED_TILES)
def test_the_residual_add_is_the_gemv_then_the_add_bit_for_bit(
    device: torch.device, dtype: torch.dtype, features: int, depth: int, config
) -> None:
    skip_bf16_off_cuda(device, dtype)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, depth, generator=generator)
    weight = torch.randn(features, depth, generator=generator) / depth**0.5
    bias = torch.randn(features, generator=generator)
    residual = torch.randn(1, features, generator=generator) * 3
    x, weight, bias, residual = (t.to(device, dtype) for t in (x, weight, bias, residual))
    block_n = (config or gemv_config(features, depth))[0]
    for with_bias in (None, bias):
        expected = (gemv(x, weight, with_bias, config=config).float() + residual.float()).to(dtype)
        stream = residual.clone()
        squares = gemv_add_residual(x, weight, with_bias, stream, config)
        assert torch.equal(stream, expected)
        assert squares.dtype == torch.float32 and squares.shape == (-(-features // block_n),)
        pieces = torch.nn.functional.pad(expected.double()[0], (0, -features % block_n))
        exact = pieces.view(-1, block_n).pow(2).sum(1)
        torch.testing.assert_close(squares.double().cpu(), exact.cpu(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "features,depth,pieces", [(64, 512, 7), (70, 300, 1), (21, 1000, 250), (40, 2048, 10)]
)
def test_the_normed_gemvs_are_the_norm_then_the_gemv_bit_for_bit(
    device: torch.device, dtype: torch.dtype, features: int, depth: int, pieces: int
) -> None:
    skip_bf16_off_cuda(device, dtype)
    generator = torch.Generator().manual_seed(1)
    stream = quarters(1, depth, generator=generator)
    gain = 1 + torch.randn(depth, generator=generator) / 4
    weight = torch.randn(2 * features, depth, generator=generator) / depth**0.5 * 4
    bias = torch.randn(2 * features, generator=generator)
    squares = stream[0].square().tensor_split(pieces)  # uneven pieces, some maybe empty
    partials = torch.stack([piece.sum() for piece in squares])
    stream, gain, weight, bias = (t.to(device, dtype) for t in (stream, gain, weight, bias))
    norm = RowNorm(gain, EPS, partials.to(device))
    normed = rms_norm(stream, gain, EPS)
    for with_bias in (None, bias):
        got = normed_gemv(stream, norm, weight, with_bias)
        assert torch.equal(got, gemv(normed, weight, with_bias))
        got = normed_gemv_silu_and_mul(stream, norm, weight, with_bias)
        assert torch.equal(got, gemv_silu_and_mul(normed, weight, with_bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_layer_of_folded_norms_is_the_unfused_chain(
    device: torch.device, dtype: torch.dtype
) -> None:
    """o_proj + add + norm + gate/up, then down + add + norm + qkv, both ways. The projections
    into the stream have zero weights and bias multiples of 1/4, so the stream stays exact."""
    generator = torch.Generator().manual_seed(2)
    hidden, width, heads = 256, 384, 192

    def fresh(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * scale).to(device, dtype)

    attention_out, residual = fresh(1, heads), quarters(1, hidden, generator=generator)
    residual = residual.to(device, dtype)
    o_proj, o_bias = torch.zeros_like(fresh(hidden, heads)), quarters(hidden, generator=generator)
    o_bias = o_bias.to(device, dtype)
    gate_up, down = fresh(2 * width, hidden, scale=0.1), torch.zeros_like(fresh(hidden, width))
    down_bias = quarters(hidden, generator=generator).to(device, dtype)
    qkv, mlp_gain, attention_gain = fresh(96, hidden, scale=0.1), fresh(hidden), fresh(hidden)

    # unfused: GEMV, add + norm, GEMV, ...
    stream = residual.clone()
    normed, stream = fused_add_rms_norm(gemv(attention_out, o_proj, o_bias), stream, mlp_gain, EPS)
    activated = gemv_silu_and_mul(normed, gate_up)
    normed, stream = fused_add_rms_norm(
        gemv(activated, down, down_bias), stream, attention_gain, EPS
    )
    expected = gemv(normed, qkv), stream

    stream = residual.clone()
    squares = gemv_add_residual(attention_out, o_proj, o_bias, stream)
    activated = normed_gemv_silu_and_mul(stream, RowNorm(mlp_gain, EPS, squares), gate_up)
    squares = gemv_add_residual(activated, down, down_bias, stream)
    got = normed_gemv(stream, RowNorm(attention_gain, EPS, squares), qkv), stream
    assert torch.equal(got[1], expected[1])
    assert torch.equal(got[0], expected[0])


def test_the_folded_norms_reject_what_they_cannot_take(device: torch.device) -> None:
    x = torch.randn(1, 64, device=device)
    weight = torch.randn(32, 64, device=device)
    with pytest.raises(ValueError, match="residual must be a contiguous"):
        gemv_add_residual(x, weight, None, torch.zeros(1, 16, device=device))
    with pytest.raises(ValueError, match="residual must share"):
        gemv_add_residual(x, weight, None, torch.zeros(1, 32, device=device, dtype=torch.half))
    squares = torch.ones(4, device=device)
    with pytest.raises(ValueError, match="norm weight must be a contiguous"):
        normed_gemv(x, RowNorm(torch.ones(32, device=device), EPS, squares), weight)
    with pytest.raises(ValueError, match="norm weight must share"):
        normed_gemv(x, RowNorm(torch.ones(64, device=device).half(), EPS, squares), weight)
    with pytest.raises(ValueError, match="partial_squares must be float32"):
        normed_gemv(x, RowNorm(torch.ones(64, device=device), EPS, squares.double()), weight)
    with pytest.raises(ValueError, match="non-empty"):
        normed_gemv(x, RowNorm(torch.ones(64, device=device), EPS, squares[:0]), weight)
    with pytest.raises(ValueError, match="one row"):
        normed_gemv(x.expand(2, 64), RowNorm(torch.ones(64, device=device), EPS, squares), weight)
