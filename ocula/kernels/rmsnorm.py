"""RMSNorm, plain and fused with the residual add: one program per row.

The torch reference is `ocula.layers.norm.rms_norm_reference` (transformers' LlamaRMSNorm). Every
rounding of it happens here too, in the same order:
  summed = x + residual            rounded to the activation dtype (the residual add)
  variance = mean(summed_f32 ** 2)  float32; the mean as torch's device computes it (see below)
  normed = summed_f32 * rsqrt(variance + eps)   float32, then rounded to the activation dtype
  out = normed * weight            in promote(activation, weight) dtype, one rounding
so an element can differ from the reference only when the two sums of squares differ. That sum's
order is the one thing this kernel does not reproduce: torch's reduction order is an internal of
its CPU and CUDA reduction kernels (on CUDA it even depends on how many rows the call has), while
here a row is always summed by one program in the same order, whatever the batch. Whenever the
float32 sum of squares is exact (then every order gives it) the outputs are bit-identical, and
otherwise the variance may differ in its last bits, which can move an output by one unit in the
last place of its dtype.

torch's `mean` divides the sum by `hidden` on CPU and multiplies it by float32(1 / hidden) on
CUDA; the kernel does what the tensors' device does.

Floating-point contraction (mul + add -> fma) is disabled so that each rounding happens where the
reference's separate elementwise kernels round.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ocula.kernels import launch_with_pdl


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    residual_out_ptr,
    hidden,
    eps,
    x_row_stride,
    residual_row_stride,
    out_row_stride,
    residual_out_row_stride,
    HAS_RESIDUAL: tl.constexpr,
    MEAN_BY_RECIPROCAL: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:  # see ocula.kernels.launch_with_pdl
        gdc_wait()
        gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * residual_row_stride + cols, mask=mask, other=0.0)
        # `x + residual` in the activation dtype: float32 sum, one rounding.
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * residual_out_row_stride + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    sum_sq = tl.sum(x32 * x32, axis=0)  # masked columns are 0 and add nothing
    if MEAN_BY_RECIPROCAL:
        variance = sum_sq * tl.math.div_rn(1.0, hidden.to(tl.float32))
    else:
        variance = tl.math.div_rn(sum_sq, hidden.to(tl.float32))
    normed = (x32 * tl.math.rsqrt(variance + eps)).to(x_ptr.dtype.element_ty)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    out = normed.to(tl.float32) * weight.to(tl.float32)
    tl.store(out_ptr + row * out_row_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor,
    residual_out: torch.Tensor | None,
) -> None:
    """All tensors [rows, hidden] with last stride 1 (weight [hidden] contiguous)."""
    rows, hidden = x.shape
    if rows == 0:
        return
    block = triton.next_power_of_2(hidden)
    pdl = launch_with_pdl(x)
    _rms_norm_kernel[(rows,)](
        x,
        residual if residual is not None else x,
        weight,
        out,
        residual_out if residual_out is not None else out,
        hidden,
        eps,
        x.stride(0),
        residual.stride(0) if residual is not None else 0,
        out.stride(0),
        residual_out.stride(0) if residual_out is not None else 0,
        HAS_RESIDUAL=residual is not None,
        MEAN_BY_RECIPROCAL=x.is_cuda,
        BLOCK=block,
        PDL=pdl,
        num_warps=min(max(block // 512, 1), 8),
        enable_fp_fusion=False,
        launch_pdl=pdl,
    )


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"weight {tuple(weight.shape)} does not match hidden size {hidden}")
    if weight.device != x.device:
        raise ValueError("x and weight must be on one device")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """norm(x) over the last dim, as a new tensor shaped like x in promote(x, weight) dtype.

    x: any shape [..., hidden]; leading dims that cannot be flattened without a copy, or a last
    stride other than 1, cost a copy of x.
    """
    _check(x, weight)
    hidden = x.shape[-1]
    rows = x.reshape(-1, hidden)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    out = torch.empty(rows.shape, dtype=out_dtype, device=x.device)
    _launch(rows, None, weight.contiguous(), eps, out, None)
    return out.view(x.shape)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual), computed IN PLACE: both inputs are consumed.

    x, residual: [rows, hidden] of one dtype, last stride 1 (rows may be strided). `residual`
    receives x + residual; `x` receives the normalized rows when promote(x, weight) is x's dtype
    (the usual case: the weight is in the model dtype), else they go to a new tensor. Returns
    (normalized, residual). Each program reads its whole row before it writes, so the aliasing
    is safe.
    """
    _check(x, weight)
    if x.dim() != 2 or x.shape != residual.shape:
        raise ValueError(
            f"x and residual must both be [rows, hidden], got {tuple(x.shape)} and "
            f"{tuple(residual.shape)}"
        )
    if x.dtype != residual.dtype or x.device != residual.device:
        raise ValueError("x and residual must share dtype and device")
    if x.stride(-1) != 1 or residual.stride(-1) != 1:
        raise ValueError("x and residual need a last stride of 1 to be updated in place")
    if x.data_ptr() == residual.data_ptr():
        raise ValueError("x and residual must be different tensors: each receives an output")
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    out = x if out_dtype == x.dtype else torch.empty(x.shape, dtype=out_dtype, device=x.device)
    _launch(x, residual, weight.contiguous(), eps, out, residual)
    return out, residual
