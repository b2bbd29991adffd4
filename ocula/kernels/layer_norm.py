"""LayerNorm, optionally fused with the scaled residual add before it: one program per row.

The vision tower's layers end in `x = x + update * layer_scale` and the next layer starts with
`LayerNorm(x)`; unfused that is three kernels and seven passes over the activations, fused one
kernel and four (read x and update, write x and the normalized rows).

The torch reference is `scaled_residual_layer_norm_reference`. Every rounding of it happens here
too, in the same order:
  scaled = update * scale          rounded to the activation dtype (torch's multiply)
  summed = x + scaled              rounded to the activation dtype (torch's add)
  mean = mean(summed_f32), var = mean((summed_f32 - mean) ** 2)   float32, biased
  out = (summed_f32 - mean) * rsqrt(var + eps) * weight + bias    float32, one rounding
What this kernel does not reproduce is the order of the float32 sums (torch's CUDA kernel uses
Welford's running update, its CPU kernel a pairwise sum; here one program sums a row in one
fixed order) and the order of the last line's float32 products: those can move the float32
values by a few units in their last place, and an output by one unit in the last place of its
dtype when that lands on a rounding boundary. The residual stream itself (`summed`) is always
bit-identical.

Floating-point contraction (mul + add -> fma) is disabled so that the residual's two roundings
happen where the reference's separate elementwise kernels round.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _layer_norm_kernel(
    x_ptr,
    update_ptr,
    scale_ptr,
    weight_ptr,
    bias_ptr,
    out_ptr,
    hidden,
    eps,
    x_row_stride,
    update_row_stride,
    out_row_stride,
    HAS_UPDATE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0)
    if HAS_UPDATE:
        update = tl.load(update_ptr + row * update_row_stride + cols, mask=mask, other=0.0)
        scale = tl.load(scale_ptr + cols, mask=mask, other=0.0)
        scaled = (update.to(tl.float32) * scale.to(tl.float32)).to(x_ptr.dtype.element_ty)
        x = (x.to(tl.float32) + scaled.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(x_ptr + row * x_row_stride + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    count = hidden.to(tl.float32)
    mean = tl.sum(x32, axis=0) / count  # masked columns are 0 and add nothing
    centered = tl.where(mask, x32 - mean, 0.0)
    variance = tl.sum(centered * centered, axis=0) / count
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    out = centered * tl.math.rsqrt(variance + eps) * weight + bias
    tl.store(out_ptr + row * out_row_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def scaled_residual_layer_norm_reference(
    x: torch.Tensor,
    update: torch.Tensor | None,
    scale: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer_norm(x + update * scale), x + update * scale) with torch's ops, out of place;
    without `update` just (layer_norm(x), x)."""
    if update is not None:
        x = x + update * scale
    normed = torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return normed, x


def scaled_residual_layer_norm(
    x: torch.Tensor,
    update: torch.Tensor | None,
    scale: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer_norm(x + update * scale), x + update * scale); `x` is updated IN PLACE (and is the
    second result). Without `update` (and `scale`), just (layer_norm(x), x), x untouched.

    x, update: [..., hidden] of one shape and dtype, rows contiguous in the last dim and
    flattenable without a copy; scale, weight, bias: [hidden]. The normalized rows are a new
    tensor in x's dtype (weight and bias are applied in float32, as torch does).
    """
    hidden = x.shape[-1]
    for name, param in (("weight", weight), ("bias", bias), ("scale", scale)):
        if param is not None and param.shape != (hidden,):
            raise ValueError(f"{name} {tuple(param.shape)} does not match hidden size {hidden}")
    if (update is None) != (scale is None):
        raise ValueError("update and scale come together")
    if scale is not None and scale.dtype != x.dtype:
        # torch would promote the residual add; this kernel keeps the stream in x's dtype.
        raise ValueError(f"scale is {scale.dtype}, x is {x.dtype}: they must match")
    rows = x.view(-1, hidden)
    if rows.stride(-1) != 1:
        raise ValueError("x needs a last stride of 1 to be updated in place")
    updates = None
    if update is not None:
        if update.shape != x.shape or update.dtype != x.dtype:
            raise ValueError(
                f"update {tuple(update.shape)} {update.dtype} does not match x "
                f"{tuple(x.shape)} {x.dtype}"
            )
        updates = update.reshape(-1, hidden)
        if updates.stride(-1) != 1:
            updates = updates.contiguous()
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    if rows.shape[0] > 0:
        block = triton.next_power_of_2(hidden)
        _layer_norm_kernel[(rows.shape[0],)](
            rows,
            updates if updates is not None else rows,
            scale.contiguous() if scale is not None else weight,
            weight.contiguous(),
            bias.contiguous(),
            out,
            hidden,
            eps,
            rows.stride(0),
            updates.stride(0) if updates is not None else 0,
            out.stride(0),
            HAS_UPDATE=updates is not None,
            BLOCK=block,
            num_warps=min(max(block // 256, 1), 8),
            enable_fp_fusion=False,
        )
    return out.view(x.shape), x
