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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ocula.kernels import launch_with_pdl


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
):
    """[BLOCK_N] float32 sums of W's rows `features` times x, K walked in BLOCK_K steps.
    With PDL_WAIT the first W tile is loaded before waiting for the previous kernel (see
    `ocula.kernels.launch_with_pdl`): weights are constants, x is that kernel's output."""
    depth = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + features[:, None].to(tl.int64) * K + depth[None, :]
    if EVEN:
        w = tl.load(w_ptrs)
    else:
        w = tl.load(w_ptrs, mask=feature_ok[:, None] & (depth < K)[None, :], other=0.0)
    if PDL_WAIT:
        gdc_wait()
        gdc_launch_dependents()
    x = tl.load(x_ptr + depth, mask=depth < K, other=0.0)
    partial = w.to(tl.float32) * x.to(tl.float32)[None, :]
    for k in range(BLOCK_K, K, BLOCK_K):
        if EVEN:
            w = tl.load(w_ptrs + k)
            x = tl.load(x_ptr + k + depth)
        else:
            depth_ok = (depth + k) < K
            w = tl.load(w_ptrs + k, mask=feature_ok[:, None] & depth_ok[None, :], other=0.0)
            x = tl.load(x_ptr + k + depth, mask=depth_ok, other=0.0)
        partial += w.to(tl.float32) * x.to(tl.float32)[None, :]
    return tl.sum(partial, axis=1)


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    y_ptr,
    N,
    K: tl.constexpr,  # a model constant; a runtime loop bound the interpreter cannot run
    HAS_BIAS: tl.constexpr,
    EVEN: tl.constexpr,  # N % BLOCK_N == 0 and K % BLOCK_K == 0: no masks
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    features = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    feature_ok = features < N
    y = rows_times_x(x_ptr, w_ptr, features, feature_ok, K, EVEN, BLOCK_N, BLOCK_K, PDL)
    if HAS_BIAS:
        y += tl.load(bias_ptr + features, mask=feature_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + features, y.to(y_ptr.dtype.element_ty), mask=feature_ok)


def gemv_config(features: int, depth: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps), from sweeps of Qwen2.5-7B's projections on an H200
    (`benchmarks/profile_gemv.py`): few features per program, longer K steps for long rows,
    twice the features when there are tens of thousands of them."""
    block_n = 8 if features >= 16384 else 4
    block_k = 512 if depth >= 8192 else 256
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
    features, depth = weight.shape
    block_n, block_k, num_warps = config or gemv_config(features, depth)
    pdl = launch_with_pdl(x)
    y = torch.empty((1, features), dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(features, block_n),)](
        x,
        weight,
        bias if bias is not None else weight,
        y,
        features,
        depth,
        HAS_BIAS=bias is not None,
        EVEN=features % block_n == 0 and depth % block_k == 0,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        PDL=pdl,
        num_warps=num_warps,
        launch_pdl=pdl,
    )
    return y


def check_gemv_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Raises ValueError unless x [1, K], weight [N, K] and bias [N] (or None) are contiguous
    and share a dtype and a device."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} cannot multiply weight {tuple(weight.shape)}^T")
    if x.shape[0] != 1:
        raise ValueError(f"gemv takes one row, got {x.shape[0]}")
    if not x.is_contiguous() or not weight.is_contiguous():
        raise ValueError("x and weight must be contiguous")
    features = weight.shape[0]
    if bias is not None and (bias.shape != (features,) or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous [{features}], got {tuple(bias.shape)}")
    others = [weight] + ([bias] if bias is not None else [])
    if any(t.dtype != x.dtype or t.device != x.device for t in others):
        raise ValueError("x, weight and bias must share a dtype and a device")
