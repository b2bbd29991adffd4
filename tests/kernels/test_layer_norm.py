"""The vision tower's fused scaled-residual + LayerNorm kernel against torch.

On the `device` fixture (CPU through Triton's interpreter: fp32 and fp16; CUDA also bf16). The
residual stream must be bit-identical to torch's `x + update * scale`; the normalized rows may
differ only as the kernel's own float32 summation order allows (bounded below, derived from the
order, not fitted to the result). The whole encoder with the kernels on must equal the torch path.
"""

from __future__ import annotations

import pytest
import torch

from ocula.distributed.parallel_group import SINGLE_RANK
from ocula.kernels.layer_norm import (
    scaled_residual_layer_norm,
    scaled_residual_layer_norm_reference,
)
from ocula.models import intern_vit
from ocula.models.internvl_config import InternViTConfig
from tests.kernels.test_fused_ops import each_dtype, randn, skip_unsupported

EPS = 1e-6


def order_bound(summed: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """How far two float32 summation orders can move each normalized output, plus one unit in
    the last place of the output dtype (a rounding the moved value can flip).

    Summing n terms in any order stays within (n - 1) 2^-24 sum|terms| of the exact sum, so the
    mean moves by at most d_mean = (n - 1) 2^-24 mean|x|; the variance (a sum of squares) by a
    relative (n - 1) 2^-24 plus 2 d_mean mean|x - mean| / var; rsqrt halves a relative error;
    the final products and the bias add (three float32 roundings) add 4 2^-24 |out|.
    """
    x = summed.float()
    n = x.shape[-1]
    unit = 2.0**-24
    mean = x.mean(-1, keepdim=True)
    centered = x - mean
    variance = (centered * centered).mean(-1, keepdim=True)
    rstd = torch.rsqrt(variance + EPS)
    d_mean = (n - 1) * unit * x.abs().mean(-1, keepdim=True)
    d_var_rel = (n - 1) * unit + 2 * d_mean * centered.abs().mean(-1, keepdim=True) / variance
    w = weight.float().abs()
    moved = w * rstd * (d_mean + centered.abs() * d_var_rel / 2) + 4 * unit * out.float().abs()
    info = torch.finfo(out.dtype)
    ulp = info.eps * (out.float().abs() + moved) + info.smallest_normal
    return moved + ulp


@each_dtype
@pytest.mark.parametrize("hidden", [64, 96, 1024])
def test_scaled_residual_is_exact_and_norm_within_the_order_bound(
    device: torch.device, dtype: torch.dtype, hidden: int
) -> None:
    skip_unsupported(device, dtype)
    x = randn(3, 7, hidden, dtype=dtype, device=device, seed=1) * 4 + 1
    update = randn(3, 7, hidden, dtype=dtype, device=device, seed=2)
    scale = randn(hidden, dtype=dtype, device=device, seed=3) * 0.3
    weight = 1 + 0.2 * randn(hidden, dtype=dtype, device=device, seed=4)
    bias = 0.1 * randn(hidden, dtype=dtype, device=device, seed=5)
    expected, expected_sum = scaled_residual_layer_norm_reference(
        x, update, scale, weight, bias, EPS
    )
    x_ptr = x.data_ptr()
    out, summed = scaled_residual_layer_norm(x, update, scale, weight, bias, EPS)
    assert summed.data_ptr() == x_ptr  # the residual stream is updated in place
    assert torch.equal(summed, expected_sum)
    difference = (out.float() - expected.float()).abs()
    assert (difference <= order_bound(expected_sum, weight, expected)).all(), difference.max()
    # A row's result does not depend on the rest of the batch.
    lone, _ = scaled_residual_layer_norm(summed[1, 2:3].clone(), None, None, weight, bias, EPS)
    plain, untouched = scaled_residual_layer_norm(summed.clone(), None, None, weight, bias, EPS)
    assert torch.equal(lone, plain[1, 2:3])
    assert torch.equal(untouched, summed)


def test_plain_layer_norm_leaves_x_alone(device: torch.device) -> None:
    x = randn(5, 96, dtype=torch.float32, device=device, seed=6)
    before = x.clone()
    weight, bias = torch.ones(96, device=device), torch.zeros(96, device=device)
    out, same = scaled_residual_layer_norm(x, None, None, weight, bias, EPS)
    assert torch.equal(x, before) and same is x
    expected, _ = scaled_residual_layer_norm_reference(x, None, None, weight, bias, EPS)
    assert ((out - expected).abs() <= order_bound(x, weight, expected)).all()


def test_bad_arguments_are_refused(device: torch.device) -> None:
    x = randn(2, 64, dtype=torch.float32, device=device, seed=7)
    ones = torch.ones(64, device=device)
    with pytest.raises(ValueError, match="come together"):
        scaled_residual_layer_norm(x, x.clone(), None, ones, ones, EPS)
    with pytest.raises(ValueError, match="must match"):
        scaled_residual_layer_norm(x, x.clone(), ones.half(), ones, ones, EPS)
    with pytest.raises(ValueError, match="hidden size"):
        scaled_residual_layer_norm(x, None, None, torch.ones(32, device=device), ones, EPS)


@pytest.mark.parametrize("norm_type", ["layer_norm", "rms_norm"])
def test_encoder_with_the_kernels_equals_the_torch_path(
    device: torch.device, monkeypatch: pytest.MonkeyPatch, norm_type: str
) -> None:
    config = InternViTConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=28,
        patch_size=14,
        qkv_bias=True,
        norm_type=norm_type,
    )
    encoder = intern_vit.InternViTEncoder(config, 3, SINGLE_RANK)
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for param in encoder.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    encoder.to(device)
    x = torch.randn(2, 5, 64, generator=generator).to(device)
    with torch.inference_mode():
        monkeypatch.setattr(intern_vit, "use_triton", lambda tensor: False)
        # The unfused layers, one after the other: the model's reference semantics.
        expected = x.clone()
        for layer in encoder.layers:
            expected = layer(expected)
        torch_path = encoder(x.clone())
        monkeypatch.setattr(intern_vit, "use_triton", lambda tensor: True)
        kernel_path = encoder(x.clone())
    assert torch.equal(torch_path, expected)
    # The kernels' float32 sums run in their own order (LayerNorm here, attention's softmax).
    torch.testing.assert_close(kernel_path, expected, atol=2e-5, rtol=1e-5)
