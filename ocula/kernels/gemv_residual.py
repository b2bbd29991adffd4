"""The batch-1 residual stream with its RMSNorms folded into the GEMVs around them.

A pre-norm decoder layer at batch 1 runs: o_proj GEMV, residual add + RMSNorm, gate/up GEMV,
..., down GEMV, residual add + RMSNorm, the next layer's qkv GEMV. Each norm is a launch of its
own between two GEMVs, on the step's critical path. Here they disappear into their neighbours:

- `gemv_add_residual` (o_proj, down): each program computes its features of y = x W^T + b,
  rounds them to the activation dtype, adds them to the residual stream in place (rounded again,
  as the residual add rounds) and writes the float32 sum of squares of its new residual
  features: one piece of the norm's statistic per program.
- `normed_gemv`, `normed_gemv_silu_and_mul` (qkv, gate/up): each program sums the pieces, and
  normalizes each slice of the residual stream as it streams the weight (`gemv.rows_times_x`).

Roundings are those of the unfused chain (GEMV, `ocula.kernels.rmsnorm.fused_add_rms_norm`,
GEMV), in the same order, with one exception: the sum of squares is summed in another order (by
pieces), so whenever the float32 sum of squares is exact the results are bit-identical to the
chain, and otherwise the variance may differ in its last bits, as the norm kernel's own order
already differs from torch's (see `ocula.kernels.rmsnorm`). The torch reference of the whole is
`F.linear(rms_norm_reference(x_prev W^T + b + residual, weight, eps), W')`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ocula.kernels import launch_with_pdl
from ocula.kernels.gemv import RowNorm, check_gemv_inputs, gemv_config, launch_gemv, rows_times_x
from ocula.kernels.gemv_silu import gemv_silu_and_mul


@triton.jit
def _gemv_add_residual_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    residual_ptr,
    partials_ptr,
    N,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN: tl.constexpr,  # N % BLOCK_N == 0 and K % BLOCK_K == 0: no masks
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,  # see ocula.kernels.launch_with_pdl; the residual is read after the wait
    NO_CONTRACT: tl.constexpr,  # CUDA: each square rounded on its own, as the norm kernel's
):
    program = tl.program_id(0)
    features = program * BLOCK_N + tl.arange(0, BLOCK_N)
    feature_ok = features < N
    y = rows_times_x(
        x_ptr, w_ptr, features, feature_ok, K, EVEN, BLOCK_N, BLOCK_K, PDL,
        w_ptr, w_ptr, 0.0, False, 1, 1, False,
    )  # fmt: skip
    if HAS_BIAS:
        y += tl.load(bias_ptr + features, mask=feature_ok, other=0.0).to(tl.float32)
    dtype = residual_ptr.dtype.element_ty
    y = y.to(dtype).to(tl.float32)  # the projection's output, as the residual add reads it
    residual = tl.load(residual_ptr + features, mask=feature_ok, other=0.0)
    summed = (y + residual.to(tl.float32)).to(dtype)  # masked features: 0, adding no square
    tl.store(residual_ptr + features, summed, mask=feature_ok)
    summed32 = summed.to(tl.float32)
    squares = libdevice.mul_rn(summed32, summed32) if NO_CONTRACT else summed32 * summed32
    tl.store(partials_ptr + program, tl.sum(squares, axis=0))


def gemv_add_residual(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor,
    config: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """residual += x [1, K] times weight [N, K]^T (+ bias [N]), IN PLACE (residual [1, N] of x's
    dtype and device, contiguous; each add rounded as the unfused chain rounds it). Returns the
    float32 sum of squares of the new residual in pieces, one per program: the `partial_squares`
    of a `RowNorm` of it. `config` overrides `gemv_config`."""
    check_gemv_inputs(x, weight, bias)
    features, depth = weight.shape
    if residual.shape != (1, features) or not residual.is_contiguous():
        raise ValueError(f"residual must be a contiguous [1, {features}], got {residual.shape}")
    if residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError("residual must share x's dtype and device")
    block_n, block_k, num_warps = config or gemv_config(features, depth)
    programs = triton.cdiv(features, block_n)
    partials = torch.empty(programs, dtype=torch.float32, device=x.device)
    pdl = launch_with_pdl(x)
    _gemv_add_residual_kernel[(programs,)](
        x,
        weight,
        bias if bias is not None else weight,
        residual,
        partials,
        features,
        depth,
        HAS_BIAS=bias is not None,
        EVEN=features % block_n == 0 and depth % block_k == 0,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        PDL=pdl,
        NO_CONTRACT=x.is_cuda,
        num_warps=num_warps,
        launch_pdl=pdl,
    )
    return partials


def check_row_norm(stream: torch.Tensor, norm: RowNorm) -> None:
    """Raises ValueError unless `norm` can normalize the row `stream` [1, K]."""
    depth = stream.shape[-1]
    if norm.weight.shape != (depth,) or not norm.weight.is_contiguous():
        raise ValueError(f"the norm weight must be a contiguous [{depth}]")
    if norm.weight.dtype != stream.dtype or norm.weight.device != stream.device:
        raise ValueError("the norm weight must share the residual stream's dtype and device")
    squares = norm.partial_squares
    if squares.dim() != 1 or squares.numel() == 0 or not squares.is_contiguous():
        raise ValueError("partial_squares must be a non-empty contiguous vector")
    if squares.dtype != torch.float32 or squares.device != stream.device:
        raise ValueError("partial_squares must be float32 on the residual stream's device")


def normed_gemv(
    stream: torch.Tensor,
    norm: RowNorm,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """RMSNorm(stream [1, K]) times weight [N, K]^T (+ bias): [1, N] in stream's dtype."""
    check_gemv_inputs(stream, weight, bias)
    check_row_norm(stream, norm)
    return launch_gemv(stream, weight, bias, norm, config)


def normed_gemv_silu_and_mul(
    stream: torch.Tensor,
    norm: RowNorm,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """silu(gate) * up of RMSNorm(stream [1, K]) times weight [2 * width, K]^T (+ bias)."""
    check_gemv_inputs(stream, weight, bias)
    check_row_norm(stream, norm)
    return gemv_silu_and_mul(stream, weight, bias, config, norm)
