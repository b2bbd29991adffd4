"""The GEMV kernel (batch-1 decode projections) against a float64 reference, and its variant with
SiLU-and-mul fused in against the two kernels it replaces.

The kernel sums K in float32 in an order of its own, so it is not bit-identical to F.linear.
What it must meet: the error bound of its float32 summation, then one rounding to the output
dtype (at most one unit in the last place of the result, as the float32 value may sit on the
other side of a rounding boundary than the exact one). Each of the BLOCK_K lanes adds
ceil(K / BLOCK_K) products in turn, a tree sums the lanes (log2 BLOCK_K levels), the bias is
added: n = ceil(K / BLOCK_K) + log2(BLOCK_K) + 2 roundings (the product's own included) on any
path, so the float32 result is within gamma_n * sum|w x| (+ |b|) with gamma_n = n u / (1 - n u),
u = 2^-24. A kernel that rounded its operands to 16 bits, or dropped any term, would not.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ocula.kernels.activation import silu_and_mul
from ocula.kernels.gemv import TUNED_TILES, gemv, gemv_config
from ocula.kernels.gemv_silu import gemv_silu_and_mul, split_config
from ocula.layers import linear as linear_module

FLOAT32_UNIT = 2.0**-24


def dtypes(device: torch.device) -> list[torch.dtype]:
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device.type == "cuda" else [])


def mantissa_bits(dtype: torch.dtype) -> int:
    return {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}[dtype]


def assert_within_bound(
    y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    block_k: int,
) -> None:
    exact = x.double() @ weight.double().T
    magnitude = x.double().abs() @ weight.double().abs().T
    if bias is not None:
        exact = exact + bias.double()
        magnitude = magnitude + bias.double().abs()
    depth = x.shape[1]
    roundings = math.ceil(depth / block_k) + int(math.log2(block_k)) + 2
    summation = roundings * FLOAT32_UNIT / (1 - roundings * FLOAT32_UNIT) * magnitude
    info = torch.finfo(y.dtype)
    exponent = torch.floor(torch.log2(exact.abs().clamp(min=info.tiny)))
    rounding = torch.exp2(exponent - mantissa_bits(y.dtype))
    error = (y.double() - exact).abs()
    worst = (error - summation - rounding).max().item()
    assert worst <= 0, f"error above the bound by {worst:.3g}"


def make(rows: int, features: int, depth: int, dtype: torch.dtype, device: torch.device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, depth, generator=generator)
    weight = torch.randn(features, depth, generator=generator) / depth**0.5
    bias = torch.randn(features, generator=generator)
    return (t.to(device=device, dtype=dtype) for t in (x, weight, bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "features,depth",
    [(64, 512), (70, 300), (21, 1000), (40, 2048)],  # even tiles; feature and depth tails
)
def test_gemv_is_within_the_float32_summation_bound(
    device: torch.device, dtype: torch.dtype, features: int, depth: int
) -> None:
    if dtype not in dtypes(device):
        pytest.skip("bf16 runs on CUDA only (the interpreter computes bf16 wrongly)")
    x, weight, bias = make(1, features, depth, dtype, device)
    for with_bias in (None, bias):
        y = gemv(x, weight, with_bias)
        assert y.shape == (1, features) and y.dtype == dtype
        expected_bias = None if with_bias is None else bias.cpu()
        block_k = gemv_config(features, depth)[1]
        assert_within_bound(y.cpu(), x.cpu(), weight.cpu(), expected_bias, block_k)


@pytest.mark.parametrize(
    "config", [(4, 256, 4), (2, 64, 2), (16, 128, 4), *sorted(set(TUNED_TILES.values()))]
)
def test_every_tile_shape_gives_the_same_bound(device: torch.device, config) -> None:
    depth = max(384, config[1])
    x, weight, bias = make(1, 45, depth, torch.float32, device, seed=3)  # 45: a feature tail
    y = gemv(x, weight, bias, config=config)
    assert_within_bound(y.cpu(), x.cpu(), weight.cpu(), bias.cpu(), config[1])


def test_gemv_rejects_what_it_cannot_take(device: torch.device) -> None:
    x, weight, bias = make(2, 16, 64, torch.float32, device)
    with pytest.raises(ValueError, match="one row"):
        gemv(x, weight)
    with pytest.raises(ValueError, match="cannot multiply"):
        gemv(x[:1, :32], weight)
    with pytest.raises(ValueError, match="contiguous"):
        gemv(x[:1, :16], weight[:, :16])
    with pytest.raises(ValueError, match="bias"):
        gemv(x[:1], weight, bias[:4])
    with pytest.raises(ValueError, match="bias"):
        gemv(x[:1], weight, torch.cat([bias, bias])[::2])  # strided
    with pytest.raises(ValueError, match="dtype"):
        gemv(x[:1], weight.double())


def test_linear_sends_one_row_on_the_gpu_to_the_gemv(device: torch.device) -> None:
    if device.type != "cuda":
        pytest.skip("the GEMV serves CUDA tensors only; on CPU linear is F.linear")
    x, weight, bias = make(4, 256, 512, torch.bfloat16, device)
    expected = gemv(x[:1], weight, bias)
    for one in (
        x[:1],
        x[:1].view(1, 1, 512),
        x[0],
        x.t().contiguous().t()[:1],
    ):  # 2-D, 3-D, 1-D, strided
        got = linear_module.linear(one, weight, bias)
        assert got.shape == (*one.shape[:-1], 256)
        assert torch.equal(got.reshape(1, 256), expected)
    assert torch.equal(linear_module.linear(x, weight, bias), F.linear(x, weight, bias))


def test_linear_is_f_linear_off_the_gpu() -> None:
    x, weight, bias = make(1, 32, 64, torch.float32, torch.device("cpu"))
    assert torch.equal(linear_module.linear(x, weight, bias), F.linear(x, weight, bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "width,depth,config",
    [(64, 512, None), (35, 300, None), (48, 256, (2, 64, 2)), (40, 384, (16, 128, 4))],
)
def test_gemv_silu_and_mul_is_the_gemv_then_the_activation_bit_for_bit(
    device: torch.device, dtype: torch.dtype, width: int, depth: int, config
) -> None:
    if dtype not in dtypes(device):
        pytest.skip("bf16 runs on CUDA only (the interpreter computes bf16 wrongly)")
    x, weight, bias = make(1, 2 * width, depth, dtype, device, seed=5)
    weight, bias = 4 * weight, 2 * bias  # gates well into both tails of the SiLU
    used = config or split_config(width, depth)
    for with_bias in (None, bias):
        got = gemv_silu_and_mul(x, weight, with_bias, config)
        expected = silu_and_mul(gemv(x, weight, with_bias, config=used))
        assert got.shape == (1, width) and got.dtype == dtype
        assert torch.equal(got, expected)


def test_gemv_silu_and_mul_needs_two_halves(device: torch.device) -> None:
    x, weight, _ = make(1, 33, 64, torch.float32, device)
    with pytest.raises(ValueError, match="two equal halves"):
        gemv_silu_and_mul(x, weight)


def test_the_tile_rule_and_its_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """1024-wide K steps where they divide the row, the tuned shapes' own tiles, and with the
    benchmark switch off (`gemv_tiles=off`) the rule before them, for A/Bs."""
    from ocula.kernels import gemv as gemv_module

    assert gemv_config(6144, 4096) == (4, 1024, 4)  # InternLM2.5-7B qkv: the rule
    assert gemv_config(28672, 4096) == (8, 1024, 4)  # gate_up: twice the rows
    assert gemv_config(4096, 14336) == TUNED_TILES[(4096, 14336)]
    assert gemv_config(4608, 3584) == (4, 256, 4)  # Qwen2.5-7B: 1024 leaves a tail
    assert gemv_config(3584, 18944) == (4, 512, 4)
    assert gemv_config(64, 64) == (4, 64, 4)  # never wider than the row
    monkeypatch.setattr(gemv_module, "WIDE_TILES", False)
    assert gemv_config(4096, 14336) == (4, 512, 4)
    assert gemv_config(6144, 4096) == (4, 256, 4)
