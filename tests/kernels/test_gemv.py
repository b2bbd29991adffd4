"""The GEMV kernel (batch-1 decode projections) against a float64 reference.

The kernel sums K in float32 in an order of its own, so it is not bit-identical to F.linear.
What it must meet: the float32 sum's error bound (K float32 roundings of the running sum, each
at most 2^-24 of it, bounded by K * 2^-24 * sum|w x|), then one rounding to the output dtype (at
most one unit in the last place of the result, as the float32 value may sit on the other side of
a rounding boundary than the exact one).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ocula.kernels.gemv import gemv
from ocula.layers import linear as linear_module

FLOAT32_UNIT = 2.0**-24


def dtypes(device: torch.device) -> list[torch.dtype]:
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device.type == "cuda" else [])


def mantissa_bits(dtype: torch.dtype) -> int:
    return {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}[dtype]


def assert_within_bound(
    y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> None:
    exact = x.double() @ weight.double().T
    magnitude = x.double().abs() @ weight.double().abs().T
    if bias is not None:
        exact = exact + bias.double()
        magnitude = magnitude + bias.double().abs()
    depth = x.shape[1] + 1
    summation = depth * FLOAT32_UNIT * magnitude
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
    [(64, 512), (72, 300), (20, 1000)],  # even tiles; a feature and a depth tail; short N
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
        assert_within_bound(y.cpu(), x.cpu(), weight.cpu(), expected_bias)


@pytest.mark.parametrize("config", [(4, 256, 4), (2, 64, 2), (16, 128, 4)])
def test_every_tile_shape_gives_the_same_bound(device: torch.device, config) -> None:
    x, weight, bias = make(1, 48, 384, torch.float16, device, seed=3)
    y = gemv(x, weight, bias, config=config)
    assert_within_bound(y.cpu(), x.cpu(), weight.cpu(), bias.cpu())


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


def test_linear_sends_one_row_on_the_gpu_to_the_gemv(device: torch.device) -> None:
    if device.type != "cuda":
        pytest.skip("the GEMV serves CUDA tensors only; on CPU linear is F.linear")
    x, weight, bias = make(4, 256, 512, torch.bfloat16, device)
    one = x[:1].view(1, 1, 512)
    expected = gemv(x[:1], weight, bias).view(1, 1, 256)
    assert torch.equal(linear_module.linear(one, weight, bias), expected)
    assert torch.equal(linear_module.linear(x, weight, bias), F.linear(x, weight, bias))


def test_linear_is_f_linear_off_the_gpu() -> None:
    x, weight, bias = make(1, 32, 64, torch.float32, torch.device("cpu"))
    assert torch.equal(linear_module.linear(x, weight, bias), F.linear(x, weight, bias))
