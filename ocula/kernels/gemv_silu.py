"""silu(gate) * up of a gated MLP's fused gate/up projection for one row, in one launch.

At batch 1 the gate/up projection is a GEMV (`ocula.kernels.gemv`) and SiLU-and-mul a second,
small launch on its output. Here each program streams BLOCK_N rows of the gate half of W and the
same rows of the up half, and applies the activation to its own features before storing: the
[1, 2 * width] intermediate is never written, and the step has one launch fewer per layer.

Bit-identical to `silu_and_mul(gemv(x, weight, bias, config))` with the config this call uses
(`split_config`'s by default): the halves are summed by the GEMV's own code on the same tiles, rounded to
x's dtype, then SiLU-and-mul rounds as `ocula.kernels.activation` does (libdevice's expf on
CUDA; the interpreter's numpy exp on CPU). Its torch reference is therefore
`silu_and_mul_reference(F.linear(x, weight, bias))` up to the GEMV's float32 summation order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ocula.kernels import launch_with_pdl
from ocula.kernels.gemv import RowNorm, check_gemv_inputs, gemv_config, rows_times_x


@triton.jit
def _gemv_silu_and_mul_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    norm_w_ptr,
    partials_ptr,
    eps,
    WIDTH: tl.constexpr,  # features per half; W holds 2 * WIDTH rows [gate | up]
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN: tl.constexpr,  # WIDTH % BLOCK_N == 0 and K % BLOCK_K == 0: no masks
    LIBDEVICE_EXP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,  # see ocula.kernels.launch_with_pdl: the gate half's pass waits first
    NORM: tl.constexpr,  # x is a residual stream to RMSNorm first (see gemv.rows_times_x)
    NUM_PARTIALS: tl.constexpr,
    PARTIALS_BLOCK: tl.constexpr,
    NO_CONTRACT: tl.constexpr,
):
    features = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    feature_ok = features < WIDTH
    gate = rows_times_x(
        x_ptr, w_ptr, features, feature_ok, K, EVEN, BLOCK_N, BLOCK_K, PDL,
        norm_w_ptr, partials_ptr, eps, NORM, NUM_PARTIALS, PARTIALS_BLOCK, NO_CONTRACT,
    )  # fmt: skip
    up = rows_times_x(
        x_ptr, w_ptr, features + WIDTH, feature_ok, K, EVEN, BLOCK_N, BLOCK_K, False,
        norm_w_ptr, partials_ptr, eps, NORM, NUM_PARTIALS, PARTIALS_BLOCK, NO_CONTRACT,
    )  # fmt: skip
    if HAS_BIAS:
        gate += tl.load(bias_ptr + features, mask=feature_ok, other=0.0).to(tl.float32)
        up += tl.load(bias_ptr + WIDTH + features, mask=feature_ok, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    gate = gate.to(dtype).to(tl.float32)  # the GEMV's output, as SiLU-and-mul would read it
    up = up.to(dtype).to(tl.float32)
    exp = libdevice.exp(-gate) if LIBDEVICE_EXP else tl.exp(-gate)
    silu = tl.math.div_rn(gate, 1.0 + exp).to(dtype).to(tl.float32)
    tl.store(out_ptr + features, (silu * up).to(dtype), mask=feature_ok)


def split_config(width: int, depth: int) -> tuple[int, int, int]:
    """(BLOCK_N per half, BLOCK_K, num_warps): a program reads as many W rows as the plain GEMV
    of the whole [2 * width, depth] weight would (`gemv_config`), half from each half."""
    block_n, block_k, num_warps = gemv_config(2 * width, depth)
    return max(1, block_n // 2), block_k, num_warps


def gemv_silu_and_mul(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: tuple[int, int, int] | None = None,
    norm: RowNorm | None = None,
) -> torch.Tensor:
    """x [1, K], weight [2 * width, K] ([gate | up] rows), bias [2 * width] or None (contiguous,
    one dtype and device) -> silu(gate) * up, [1, width] in x's dtype. `config` overrides
    `split_config` (BLOCK_N counts the rows of one half). With `norm`, of RMSNorm(x) (checked
    by `ocula.kernels.gemv_residual.normed_gemv_silu_and_mul`)."""
    check_gemv_inputs(x, weight, bias)
    features, depth = weight.shape
    if features % 2:
        raise ValueError(f"the weight's {features} rows must hold two equal halves")
    width = features // 2
    block_n, block_k, num_warps = config or split_config(width, depth)
    pdl = launch_with_pdl(x)
    partials = norm.partial_squares.numel() if norm is not None else 1
    out = torch.empty((1, width), dtype=x.dtype, device=x.device)
    _gemv_silu_and_mul_kernel[(triton.cdiv(width, block_n),)](
        x,
        weight,
        bias if bias is not None else weight,
        out,
        norm.weight if norm is not None else weight,
        norm.partial_squares if norm is not None else weight,
        norm.eps if norm is not None else 0.0,
        width,
        depth,
        HAS_BIAS=bias is not None,
        EVEN=width % block_n == 0 and depth % block_k == 0,
        LIBDEVICE_EXP=x.is_cuda,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        PDL=pdl,
        NORM=norm is not None,
        NUM_PARTIALS=partials,
        PARTIALS_BLOCK=triton.next_power_of_2(partials),
        NO_CONTRACT=x.is_cuda,
        num_warps=num_warps,
        launch_pdl=pdl,
    )
    return out
