"""SiLU-and-mul of a gated MLP: x = [gate | up] -> silu(gate) * up.

The torch reference is `ocula.layers.activation.silu_and_mul_reference`, i.e.
`F.silu(gate) * up`. Its roundings are reproduced, so the result is bit-identical:
  silu = gate / (1 + exp(-gate))   in float32 (IEEE division), rounded to the dtype
  out  = silu * up                 in float32, rounded to the dtype
On CUDA the exponential is libdevice's expf, the function torch's CUDA silu calls. Triton's
interpreter (CPU tests) cannot call libdevice, so there it is numpy's exp, which agrees with
torch's CPU exp almost always but is not guaranteed to in the last bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,
    out_ptr,
    width,
    x_row_stride,
    out_row_stride,
    LIBDEVICE_EXP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gate = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_row_stride + width + cols, mask=mask, other=0.0).to(tl.float32)
    exp = libdevice.exp(-gate) if LIBDEVICE_EXP else tl.exp(-gate)
    dtype = out_ptr.dtype.element_ty
    silu = tl.math.div_rn(gate, 1.0 + exp).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * out_row_stride + cols, (silu * up).to(dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2 * width] -> silu(x[..., :width]) * x[..., width:] as a new [..., width] tensor.

    Same dtype as x (fp32, fp16 or bf16). Leading dims that cannot be flattened without a copy,
    or a last stride other than 1, cost a copy of x.
    """
    if x.shape[-1] % 2:
        raise ValueError(f"the last dim ({x.shape[-1]}) must hold two equal halves")
    width = x.shape[-1] // 2
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty((rows.shape[0], width), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out.view(*x.shape[:-1], width)
    block = min(triton.next_power_of_2(width), 1024)
    _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(width, block))](
        rows,
        out,
        width,
        rows.stride(0),
        out.stride(0),
        LIBDEVICE_EXP=x.is_cuda,
        BLOCK=block,
        num_warps=4,
        enable_fp_fusion=False,
    )
    return out.view(*x.shape[:-1], width)
