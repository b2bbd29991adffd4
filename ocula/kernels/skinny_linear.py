"""y = x W^T (+ b) for a few rows of x (2 to `MAX_ROWS`): decode steps of small batches and
short prefill chunks (a follow-up over a cached prefix).

With a few rows the product is still bound by reading W once, and cuBLAS's time does not move
from 1 to 64 rows. This kernel streams W like the GEMV (`ocula.kernels.gemv`) but multiplies on
the tensor cores with W's features as the long side of the MMA ("swap AB"): each program owns
BLOCK_N output features and walks K in BLOCK_K steps,
    acc[BLOCK_N, BLOCK_M] += W[features, k:k+BLOCK_K] @ x[:, k:k+BLOCK_K]^T,
with x's rows padded to BLOCK_M (16 or 32, `row_block`). Rows past M are neither read nor
written. Where both tensors allow it (`tma_fits`), the tiles come through tensor descriptors
(TMA on Hopper): 0.4-11% faster than pointer loads alone on every projection (the small ones
most), about equal in a decode step. On an H100 a decode step at batch 2-32 takes 0.11-0.27 ms
less than on cuBLAS (BENCHMARKS.md). At 33-64 rows cuBLAS stays: alone, under an L2 flush, the
kernel led on the widest weights (gate_up, the LM head), but inside the step cuBLAS's gate_up
runs at 0.87-0.90 of the copy-bandwidth floor and the kernel behind it.

The torch reference is `F.linear(x, weight, bias)`. Products are summed in float32 (fp32 inputs
multiply in IEEE float32, not TF32), the bias is added in float32 and the result rounded once to
x's dtype; the order of the K sum differs from cuBLAS's, so results agree to float32 summation,
not bit for bit. A row's result depends on that row and on BLOCK_M only: rows padded to the same
BLOCK_M get the same bits alone or in a batch.

With programmatic dependent launch (`ocula.kernels.launch_with_pdl`) every program loads its first
W tile, then waits for the previous kernel before it reads x.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
from triton.tools.tensor_descriptor import TensorDescriptor

from ocula.kernels import hopper_or_later, launch_with_pdl
from ocula.kernels.gemv import check_row_inputs

MAX_ROWS = 32
# Whether tiles come through tensor descriptors where `tma_fits` (a constant; the benchmark
# scripts' `--switches skinny_tma=off` clears it for an A/B against pointer loads).
USE_TMA = True
MMA_MIN_ROWS = 16  # the smallest BLOCK_M: x's rows are padded to at least one MMA width
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
    x_desc,  # tensor descriptors of x and W when TMA, else unused (the pointers stand in)
    w_desc,
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
    TMA: tl.constexpr,  # tiles through the descriptors (zero-filled past M, N and K)
):
    first = tl.program_id(0) * BLOCK_N
    features = first + tl.arange(0, BLOCK_N)
    feature_ok = features < N
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < M
    depth = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + features[:, None].to(tl.int64) * K + depth[None, :]
    x_ptrs = x_ptr + rows[:, None] * K + depth[None, :]
    # The first step outside the loop: its W tile is loaded before the PDL wait.
    depth_ok = depth < K
    if TMA:
        w = w_desc.load([first, 0])
    else:
        w = tl.load(w_ptrs, mask=feature_ok[:, None] & depth_ok[None, :], other=0.0)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    if TMA:
        x = x_desc.load([0, 0])
    else:
        x = tl.load(x_ptrs, mask=row_ok[:, None] & depth_ok[None, :], other=0.0)
    acc = tl.dot(w, tl.trans(x), input_precision=PRECISION)
    NUM_STEPS: tl.constexpr = triton.cdiv(K, BLOCK_K)
    for step in tl.range(1, NUM_STEPS, num_stages=STAGES):
        k = step * BLOCK_K
        if TMA:
            w = w_desc.load([first, k])
            x = x_desc.load([0, k])
        else:
            depth_ok = (depth + k) < K
            w = tl.load(w_ptrs + k, mask=feature_ok[:, None] & depth_ok[None, :], other=0.0)
            x = tl.load(x_ptrs + k, mask=row_ok[:, None] & depth_ok[None, :], other=0.0)
        acc = tl.dot(w, tl.trans(x), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + features, mask=feature_ok, other=0.0).to(tl.float32)[:, None]
    y_ptrs = y_ptr + rows[None, :] * N + features[:, None]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=feature_ok[:, None] & row_ok[None, :])


def row_block(rows: int) -> int:
    """BLOCK_M for `rows` rows of x: the MMA's smallest width, 16, or the next power of two."""
    return max(MMA_MIN_ROWS, triton.next_power_of_2(rows))


def skinny_config(
    features: int,
    depth: int,
    element_size: int = 2,
    budget: int | None = None,
    block_m: int = MMA_MIN_ROWS,
) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, STAGES), from a sweep of Qwen2.5-7B's projections on an H100 at 2-32
    rows with TMA loads (BENCHMARKS.md): 32 features by 256-wide K steps where the row is at
    least as long as the features (o, down), 64 by 128 otherwise, with 5 stages, 3 for tens of
    thousands of features (gate_up, the LM head); each within 1-2% of the best of 9-11 tile
    shapes. Other models' shapes take the same rule (InternLM2.5-7B's were not swept with TMA).
    Then at most as many stages as `budget` bytes of shared memory hold (default: a Hopper's),
    the K step halved where not even one does (float32 inputs, GPUs with less). The pipeline
    holds STAGES + 1 pairs of W and x tiles (Triton asked for 6 x 40 KB at 5 stages of
    80 x 256 bf16); `block_m` is x's tile height (`row_block`)."""
    if budget is None:
        budget = shared_budget(None)
    if features <= depth:
        block_n, block_k, stages = 32, 256, 5
    elif features >= 16384:
        block_n, block_k, stages = 64, 128, 3
    else:
        block_n, block_k, stages = 64, 128, 5
    block_k = min(block_k, max(16, triton.next_power_of_2(depth)))
    while block_k > 16 and 2 * (block_n + block_m) * block_k * element_size > budget:
        block_k //= 2
    pair = (block_n + block_m) * block_k * element_size
    return block_n, block_k, max(1, min(stages, budget // pair - 1))


def tma_fits(tensor: torch.Tensor) -> bool:
    """Whether a contiguous 2-D tensor can be read through a tensor descriptor: on a GPU with
    TMA (Hopper on) or in the interpreter, base address and row stride multiples of 16 bytes."""
    if not USE_TMA or (tensor.is_cuda and not hopper_or_later(tensor.device.index)):
        return False
    row_bytes = tensor.shape[-1] * tensor.element_size()
    return tensor.data_ptr() % 16 == 0 and row_bytes % 16 == 0


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
    block_m = row_block(rows)
    budget = shared_budget(x.device.index if x.is_cuda else None)
    block_n, block_k, stages = config or skinny_config(
        features, depth, x.element_size(), budget, block_m
    )
    tma = tma_fits(x) and tma_fits(weight)
    x_desc, w_desc = x, weight
    if tma:
        x_desc = TensorDescriptor(x, list(x.shape), list(x.stride()), [block_m, block_k])
        w_desc = TensorDescriptor(
            weight, list(weight.shape), list(weight.stride()), [block_n, block_k]
        )
    pdl = launch_with_pdl(x)
    y = torch.empty((rows, features), dtype=x.dtype, device=x.device)
    _skinny_linear_kernel[(triton.cdiv(features, block_n),)](
        x,
        weight,
        x_desc,
        w_desc,
        bias if bias is not None else weight,
        y,
        rows,
        features,
        depth,
        HAS_BIAS=bias is not None,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        STAGES=stages,
        PDL=pdl,
        TMA=tma,
        num_warps=4,
        launch_pdl=pdl,
    )
    return y
