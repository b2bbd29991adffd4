"""y = W x (+ b) for one row x: the projections of a batch-1 decode step.

With one row the product is bound by reading W once, so the kernel is a weight stream: each
program owns `BLOCK_N` output features and walks K in `BLOCK_K` steps, multiplying the W tile by
x on the CUDA cores and summing in float32. Small `BLOCK_N` gives many programs, so every SM
keeps loads in flight from the start and the tail is short: on an H200 a 7B model's bf16
projections take 8-28% less time than with cuBLAS at batch 1 (BENCHMARKS.md; fp32 rows take the
same kernel, untimed, so the fp32 token-exact GPU tests cover it). With two or more rows cuBLAS
stays ahead (its time does not grow up to 8 rows; a tile of several rows here lost), so the
kernel takes one.

The torch reference is `F.linear(x, weight, bias)`. Products and sums are float32, the bias is
added in float32, and the result is rounded once to x's dtype (as cuBLAS's epilogue does); the
order of the K sum differs from cuBLAS's, so results agree to float32 summation, not bit for bit.

The kernel can also normalize x first (`RowNorm`; `ocula.kernels.gemv_residual` folds the
decoder's RMSNorms into the GEMVs this way).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ocula.kernels import launch_with_pdl


@triton.jit
def row_rstd(
    partials_ptr,
    K,
    eps,
    NUM_PARTIALS: tl.constexpr,
    PARTIALS_BLOCK: tl.constexpr,
    NO_CONTRACT: tl.constexpr,
):
    """rsqrt(mean of squares + eps) of a row whose sum of squares comes in NUM_PARTIALS float32
    pieces (`ocula.kernels.gemv_residual`), rounded as `ocula.kernels.rmsnorm` rounds it on the
    tensors' device: CUDA's mean multiplies by float32(1 / K) (NO_CONTRACT keeps that product
    and the + eps two roundings, not one fma), the interpreter's divides."""
    pieces = tl.arange(0, PARTIALS_BLOCK)
    squares = tl.load(partials_ptr + pieces, mask=pieces < NUM_PARTIALS, other=0.0)
    sum_sq = tl.sum(squares, axis=0)
    hidden = tl.full([], K, tl.float32)
    if NO_CONTRACT:
        variance = libdevice.mul_rn(sum_sq, tl.math.div_rn(1.0, hidden))
        shifted = libdevice.add_rn(variance, eps)
    else:
        shifted = tl.math.div_rn(sum_sq, hidden) + eps
    return tl.math.rsqrt(shifted)


@triton.jit
def x_slice(x_ptr, norm_w_ptr, rstd, k, depth, K, EVEN: tl.constexpr, NORM: tl.constexpr):
    """x[k + depth] as the GEMV multiplies it. With NORM, x is the residual stream and this is
    its RMSNorm, rounded as `ocula.layers.norm.rms_norm_reference` rounds: x * rstd to x's
    dtype, then times the norm weight (of x's dtype) to x's dtype."""
    if EVEN:
        x = tl.load(x_ptr + k + depth)
    else:
        x = tl.load(x_ptr + k + depth, mask=(depth + k) < K, other=0.0)
    if NORM:
        dtype = x_ptr.dtype.element_ty
        if EVEN:
            gain = tl.load(norm_w_ptr + k + depth)
        else:
            gain = tl.load(norm_w_ptr + k + depth, mask=(depth + k) < K, other=0.0)
        normed = (x.to(tl.float32) * rstd).to(dtype)
        x = (normed.to(tl.float32) * gain.to(tl.float32)).to(dtype)
    return x


@triton.jit
def rows_times_x(
    x_ptr,
    w_ptr,
    features,
    feature_ok,
    K: tl.constexpr,
    EVEN: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL_WAIT: tl.constexpr,
    norm_w_ptr,
    partials_ptr,
    eps,
    NORM: tl.constexpr,
    NUM_PARTIALS: tl.constexpr,
    PARTIALS_BLOCK: tl.constexpr,
    NO_CONTRACT: tl.constexpr,
):
    """[BLOCK_N] float32 sums of W's rows `features` times x, K walked in BLOCK_K steps.
    With PDL_WAIT the first W tile is loaded before waiting for the previous kernel (see
    `ocula.kernels.launch_with_pdl`): weights are constants, x is that kernel's output.
    With NORM, x is RMSNorm(x) with weight `norm_w_ptr` and the sum of squares of x in
    NUM_PARTIALS pieces at `partials_ptr` (see `x_slice`, `row_rstd`)."""
    depth = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + features[:, None].to(tl.int64) * K + depth[None, :]
    if EVEN:
        w = tl.load(w_ptrs)
    else:
        w = tl.load(w_ptrs, mask=feature_ok[:, None] & (depth < K)[None, :], other=0.0)
    if PDL_WAIT:
        gdc_wait()
        gdc_launch_dependents()
    rstd = 1.0
    if NORM:
        rstd = row_rstd(partials_ptr, K, eps, NUM_PARTIALS, PARTIALS_BLOCK, NO_CONTRACT)
    x = x_slice(x_ptr, norm_w_ptr, rstd, 0, depth, K, EVEN, NORM)
    partial = w.to(tl.float32) * x.to(tl.float32)[None, :]
    for k in range(BLOCK_K, K, BLOCK_K):
        if EVEN:
            w = tl.load(w_ptrs + k)
        else:
            depth_ok = (depth + k) < K
            w = tl.load(w_ptrs + k, mask=feature_ok[:, None] & depth_ok[None, :], other=0.0)
        x = x_slice(x_ptr, norm_w_ptr, rstd, k, depth, K, EVEN, NORM)
        partial += w.to(tl.float32) * x.to(tl.float32)[None, :]
    return tl.sum(partial, axis=1)


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    y_ptr,
    norm_w_ptr,
    partials_ptr,
    eps,
    N,
    K: tl.constexpr,  # a model constant; a runtime loop bound the interpreter cannot run
    HAS_BIAS: tl.constexpr,
    EVEN: tl.constexpr,  # N % BLOCK_N == 0 and K % BLOCK_K == 0: no masks
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
    NORM: tl.constexpr,  # x is a residual stream to RMSNorm first (see rows_times_x)
    NUM_PARTIALS: tl.constexpr,
    PARTIALS_BLOCK: tl.constexpr,
    NO_CONTRACT: tl.constexpr,
):
    features = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    feature_ok = features < N
    y = rows_times_x(
        x_ptr, w_ptr, features, feature_ok, K, EVEN, BLOCK_N, BLOCK_K, PDL,
        norm_w_ptr, partials_ptr, eps, NORM, NUM_PARTIALS, PARTIALS_BLOCK, NO_CONTRACT,
    )  # fmt: skip
    if HAS_BIAS:
        y += tl.load(bias_ptr + features, mask=feature_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + features, y.to(y_ptr.dtype.element_ty), mask=feature_ok)


# Whether `gemv_config` uses `TUNED_TILES` and 1024-wide K steps (the eleventh session's tiles);
# off, the rule before them. A constant; the benchmark scripts' `--switches gemv_tiles=off` clear
# it for A/Bs on other GPUs.
WIDE_TILES = True

# (features, depth) -> (BLOCK_N, BLOCK_K, num_warps) where a shape's own sweep beat the rule of
# `gemv_config` in the model: InternLM2.5-7B's o and down projections (H100, 2026-12-05: its
# batch-1 decode step 5.50 -> 5.40 ms). Other shapes, tensor-parallel shards included, take the rule.
TUNED_TILES: dict[tuple[int, int], tuple[int, int, int]] = {
    (4096, 4096): (8, 1024, 4),
    (4096, 14336): (16, 1024, 8),
}


def gemv_config(features: int, depth: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps), from sweeps of the projections of Qwen2.5-7B (H200, H100)
    and InternLM2.5-7B (H100) (`benchmarks/profile_gemv.py`): `TUNED_TILES` where a shape has
    its own; else few features per program, twice the features when there are tens of thousands
    of them, and K steps of 1024 when they divide the row (InternLM2.5's 4096 and 14336: its
    decode step 5.61 -> 5.50 ms on an H100 against 256- or 512-wide steps); otherwise 512 for
    long rows and 256 for short ones (Qwen2.5's 3584 and 18944, which 1024-wide steps would
    leave a masked tail)."""
    if WIDE_TILES and (features, depth) in TUNED_TILES:
        return TUNED_TILES[(features, depth)]
    block_n = 8 if features >= 16384 else 4
    wide_k = WIDE_TILES and depth % 1024 == 0
    block_k = 1024 if wide_k else 512 if depth >= 8192 else 256
    return block_n, min(block_k, triton.next_power_of_2(depth)), 4


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """x [1, K] times weight [N, K]^T, + bias [N] (all contiguous, one dtype and device):
    [1, N] in x's dtype. `config` overrides `gemv_config` (for sweeps)."""
    check_gemv_inputs(x, weight, bias)
    return launch_gemv(x, weight, bias, None, config)


@dataclass(frozen=True)
class RowNorm:
    """An RMSNorm to apply to the GEMV's x first: its weight (x's dtype, [K]), its eps, and the
    float32 sum of squares of x in pieces that add up to it (`ocula.kernels.gemv_residual`)."""

    weight: torch.Tensor
    eps: float
    partial_squares: torch.Tensor


def launch_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    norm: RowNorm | None,
    config: tuple[int, int, int] | None,
) -> torch.Tensor:
    """The GEMV of checked inputs, of RMSNorm(x) with `norm`: [1, N] in x's dtype."""
    features, depth = weight.shape
    block_n, block_k, num_warps = config or gemv_config(features, depth)
    pdl = launch_with_pdl(x)
    partials = norm.partial_squares.numel() if norm is not None else 1
    y = torch.empty((1, features), dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(features, block_n),)](
        x,
        weight,
        bias if bias is not None else weight,
        y,
        norm.weight if norm is not None else weight,
        norm.partial_squares if norm is not None else weight,
        norm.eps if norm is not None else 0.0,
        features,
        depth,
        HAS_BIAS=bias is not None,
        EVEN=features % block_n == 0 and depth % block_k == 0,
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
    return y


def check_gemv_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """`check_row_inputs` for one row."""
    check_row_inputs(x, weight, bias, max_rows=1)


def check_row_inputs(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, max_rows: int
) -> None:
    """Raises ValueError unless x [M, K] (1 <= M <= max_rows), weight [N, K] and bias [N] (or
    None) are contiguous and share a dtype and a device."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} cannot multiply weight {tuple(weight.shape)}^T")
    if not 1 <= x.shape[0] <= max_rows:
        takes = "one row" if max_rows == 1 else f"1 to {max_rows} rows"
        raise ValueError(f"this kernel takes {takes}, got {x.shape[0]}")
    if not x.is_contiguous() or not weight.is_contiguous():
        raise ValueError("x and weight must be contiguous")
    features = weight.shape[0]
    if bias is not None and (bias.shape != (features,) or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous [{features}], got {tuple(bias.shape)}")
    others = [weight] + ([bias] if bias is not None else [])
    if any(t.dtype != x.dtype or t.device != x.device for t in others):
        raise ValueError("x, weight and bias must share a dtype and a device")
