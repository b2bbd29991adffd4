"""y = x W^T (+ b) for a few rows of x (2 to `MAX_ROWS`): decode steps of small batches and
prefill chunks of up to 16 tokens (a short follow-up over a cached prefix).

With a few rows the product is still bound by reading W once, and cuBLAS's time does not move
from 1 to 32 rows. This kernel streams W like the GEMV (`ocula.kernels.gemv`) but multiplies on
the tensor cores with W's features as the long side of the MMA ("swap AB"): each program owns
BLOCK_N output features and walks K in BLOCK_K steps,
    acc[BLOCK_N, BLOCK_M] += W[features, k:k+BLOCK_K] @ x[:, k:k+BLOCK_K]^T,
with x's rows padded to the MMA's smallest width, 16, by masked loads. Rows past M are neither
read nor written. On an H100 it takes 0.94-0.98 of cuBLAS's time on the large projections of
Qwen2.5-7B and InternLM2.5-7B (gate_up, down, LM head) and about as long on the small ones, and
a decode step at batch 2-16 ~5% less (BENCHMARKS.md). 32 rows were slower than cuBLAS on the
down projections (the wider x tile left room for fewer pipeline stages), so they stay there.

The torch reference is `F.linear(x, weight, bias)`. Products are summed in float32 (fp32 inputs
multiply in IEEE float32, not TF32), the bias is added in float32 and the result rounded once to
x's dtype; the order of the K sum differs from cuBLAS's, so results agree to float32 summation,
not bit for bit. Each row's result depends on that row only.

With programmatic dependent launch (`ocula.kernels.launch_with_pdl`) every program loads its first
W tile, then waits for the previous kernel before it reads x.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ocula.kernels import launch_with_pdl
from ocula.kernels.gemv import check_row_inputs

MAX_ROWS = 16  # = BLOCK_M, one MMA width of rows
# Shared memory per block, as Triton reads it from the GPU: the H100's and H200's 227 KB stand in
# for it off the GPU (the interpreter). A config fills all of it but `SHARED_HEADROOM_BYTES` with
# its pipeline's W and x tiles.
HOPPER_SHARED_BYTES = 232_448
SHARED_HEADROOM_BYTES = 16 * 1024


@functools.cache
def shared_budget(device_index: int | None) -> int:
    """Bytes of shared memory a config may use on CUDA device `device_index` (None: off the GPU):
    an A100 has 163 KB a block and an L40 99 KB, against the Hopper's 227 KB the rule was tuned
    on, so its stages and K steps shrink there instead of failing to launch."""
    limit = HOPPER_SHARED_BYTES
    if device_index is not None:
        properties = triton.runtime.driver.active.utils.get_device_properties(device_index)
        limit = properties["max_shared_mem"]
    return limit - SHARED_HEADROOM_BYTES


@triton.jit
def _skinny_linear_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K: tl.constexpr,  # a model constant; the interpreter needs a compile-time trip count
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee" for float32 inputs (not TF32); Triton's default otherwise
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    STAGES: tl.constexpr,
    PDL: tl.constexpr,
):
    features = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    feature_ok = features < N
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < M
    depth = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + features[:, None].to(tl.int64) * K + depth[None, :]
    x_ptrs = x_ptr + rows[:, None] * K + depth[None, :]
    # The first step outside the loop: its W tile is loaded before the PDL wait.
    depth_ok = depth < K
    w = tl.load(w_ptrs, mask=feature_ok[:, None] & depth_ok[None, :], other=0.0)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    x = tl.load(x_ptrs, mask=row_ok[:, None] & depth_ok[None, :], other=0.0)
    acc = tl.dot(w, tl.trans(x), input_precision=PRECISION)
    NUM_STEPS: tl.constexpr = triton.cdiv(K, BLOCK_K)
    for step in tl.range(1, NUM_STEPS, num_stages=STAGES):
        k = step * BLOCK_K
        depth_ok = (depth + k) < K
        w = tl.load(w_ptrs + k, mask=feature_ok[:, None] & depth_ok[None, :], other=0.0)
        x = tl.load(x_ptrs + k, mask=row_ok[:, None] & depth_ok[None, :], other=0.0)
        acc = tl.dot(w, tl.trans(x), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + features, mask=feature_ok, other=0.0).to(tl.float32)[:, None]
    y_ptrs = y_ptr + rows[None, :] * N + features[:, None]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=feature_ok[:, None] & row_ok[None, :])


def skinny_config(
    features: int, depth: int, element_size: int = 2, budget: int | None = None
) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, STAGES), from sweeps of Qwen2.5-7B's and InternLM2.5-7B's projections
    on an H100 at 16 rows (BENCHMARKS.md): 512-wide K steps for long rows (the down projections),
    128-wide ones for tens of thousands of features (gate_up, the LM head), 256 otherwise; then
    as many stages as `budget` bytes of shared memory hold (default: a Hopper's; up to 5), K
    steps halved if even one does not (float32 inputs, GPUs with less). The pipeline holds
    STAGES + 1 pairs of W and x tiles (Triton asked for 6 x 40 KB at 5 stages of 80 x 256 bf16)."""
    if budget is None:
        budget = shared_budget(None)
    if depth >= 8192:
        block_n, block_k, stages = 32, 512, 3
    elif features >= 16384:
        block_n, block_k, stages = 64, 128, 3
    else:
        block_n, block_k, stages = 64, 256, 5
    block_k = min(block_k, max(16, triton.next_power_of_2(depth)))
    while block_k > 16 and 2 * (block_n + MAX_ROWS) * block_k * element_size > budget:
        block_k //= 2
    pair = (block_n + MAX_ROWS) * block_k * element_size
    return block_n, block_k, max(1, min(stages, budget // pair - 1))


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """x [M, K] (1 <= M <= MAX_ROWS) times weight [N, K]^T, + bias [N] (all contiguous, one
    dtype and device): [M, N] in x's dtype. `config` overrides `skinny_config` (for sweeps)."""
    check_row_inputs(x, weight, bias, MAX_ROWS)
    rows, depth = x.shape
    features = weight.shape[0]
    budget = shared_budget(x.device.index if x.is_cuda else None)
    block_n, block_k, stages = config or skinny_config(features, depth, x.element_size(), budget)
    pdl = launch_with_pdl(x)
    y = torch.empty((rows, features), dtype=x.dtype, device=x.device)
    _skinny_linear_kernel[(triton.cdiv(features, block_n),)](
        x,
        weight,
        bias if bias is not None else weight,
        y,
        rows,
        features,
        depth,
        HAS_BIAS=bias is not None,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=MAX_ROWS,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        STAGES=stages,
        PDL=pdl,
        num_warps=4,
        launch_pdl=pdl,
    )
    return y
