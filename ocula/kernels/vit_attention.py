"""Bidirectional (non-causal) attention for the vision tower: one sequence per tile.

`vit_attention(q, k, v, scale)` takes q, k, v as [tiles, tokens, heads, head_dim] views of the qkv
projection's output (any strides, as long as the last one is 1: a split of the fused projection
needs no copy) and returns [tiles, tokens, heads * head_dim], ready for the output projection.
Every tile attends only to its own tokens; no token is masked inside a tile.

The kernel is a flash-attention forward: one program owns BLOCK_M queries of one (tile, head),
walks the keys in blocks of BLOCK_N with an online softmax in float32 (exp2, log2(e) folded
into the scale, which must be positive), and multiplies with `tl.dot` accumulating in float32.
The token count is a compile-time constant (one compilation per tile size, which a model
fixes). Token counts need not be a multiple of the blocks (InternViT's 448 px tiles have
1 + 32 * 32 = 1025 tokens): only the last key block is masked, and query rows past the end are
neither read nor written. A last query or key block that is mostly padding shrinks to the next
power of two (at least 16) that holds its tokens (`tail_block`): 1025 tokens leave one past
64 x 16, and a 64-row block for it did 12% of a tile and head's work on padding.

`vit_attention_reference` is the torch oracle (SDPA) under the same contract.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# A constant; the benchmarks' `--switches vit_short_tails=off` clear it for an A/B.
SHORT_TAILS = True


def supports_head_dim(head_dim: int) -> bool:
    """The kernel needs a power-of-two head_dim in [16, 256] (tl.dot's shapes)."""
    return 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0


def vit_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Same contract as `vit_attention`, computed by SDPA in the inputs' dtype."""
    tiles, tokens, heads, head_dim = q.shape
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale
    )
    return out.transpose(1, 2).reshape(tiles, tokens, heads * head_dim)


def vit_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    block_m: int | None = None,
    block_n: int | None = None,
    short_tails: bool | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v per (tile, head), over all tokens of the tile.

    q, k, v: [tiles, tokens, heads, head_dim], one dtype (fp16, bf16 or fp32), one device; a last
    stride other than 1 costs a copy. Returns a new contiguous [tiles, tokens, heads * head_dim]
    tensor in that dtype. `block_m` / `block_n` override the block sizes (powers of two, >= 16);
    leave them None outside tests. `short_tails=False` runs the last query and key blocks at
    full size (the same function; for tests), None follows `SHORT_TAILS`.
    """
    _check_inputs(q, k, v)
    if not 0 < scale < math.inf:
        raise ValueError(f"the softmax scale must be positive and finite, got {scale}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    tiles, tokens, heads, head_dim = q.shape
    out = torch.empty((tiles, tokens, heads, head_dim), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out.view(tiles, tokens, heads * head_dim)
    block_m, block_n, num_warps, num_stages = _launch_config(tokens, head_dim, block_m, block_n)
    tail_m, tail_n = (tail_block(tokens, block_m), tail_block(tokens, block_n))
    if not (SHORT_TAILS if short_tails is None else short_tails):
        tail_m, tail_n = block_m, block_n
    # Query blocks of one (tile, head) run next to each other, so its keys stay in L2.
    grid = (triton.cdiv(tokens, block_m), heads, tiles)
    _vit_attention_kernel[grid](
        q,
        k,
        v,
        out,
        scale * math.log2(math.e),
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *out.stride()[:3],
        TOKENS=tokens,
        HEAD_DIM=head_dim,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        TAIL_M=tail_m,
        TAIL_N=tail_n,
        # fp32 inputs keep full precision on tensor cores (no tf32); 16-bit inputs ignore it.
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out.view(tiles, tokens, heads * head_dim)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            "q, k, v must all be [tiles, tokens, heads, head_dim], got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one of {SUPPORTED_DTYPES}, got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on one device")
    if not supports_head_dim(q.shape[-1]):
        raise ValueError(f"head_dim {q.shape[-1]} is not a power of two in [16, 256]")


def _launch_config(
    tokens: int, head_dim: int, block_m: int | None = None, block_n: int | None = None
) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for one shape; block sizes given by the caller
    are kept. Measured on an H100 (bf16, 8-32 tiles): 64 x 64 blocks, 4 warps, 3 stages were the
    best or within 3% of it for head_dim 128 and for 1025 tokens; 128-query blocks with 8 warps
    won (by about 7%) only for head_dim 64 with token counts whose 128-block tail is over half
    full (1024 tokens); at 1025 the last 128-block would hold a single query. With that query
    in a 16-row tail block (`tail_block`), 128-query blocks still lost at 1025 tokens: 0.398
    against 0.367 ms at 32 tiles (H100, 2026-12-07).
    """
    tail = tokens % 128
    wide = head_dim <= 64 and tokens > 64 and (tail == 0 or tail > 64)
    block_m = block_m or (128 if wide else 64)
    block_n = block_n or (64 if head_dim <= 128 else 32)
    num_warps = 8 if block_m >= 128 else 4
    num_stages = 3 if head_dim <= 128 else 2
    return block_m, block_n, num_warps, num_stages


def tail_block(tokens: int, block: int) -> int:
    """The block size for the tokens past the last full `block`: the next power of two, at
    least 16 (tl.dot's smallest side), at most `block`."""
    left = tokens % block
    if left == 0:
        return block
    return min(block, max(16, 1 << (left - 1).bit_length()))


@triton.jit
def _attend_key_block(
    acc,
    row_max,
    row_sum,
    q,
    k_ptrs,
    v_ptrs,
    start_n,
    tokens,
    stride_k_token,
    stride_v_token,
    qk_scale,
    BLOCK_N: tl.constexpr,
    MASK_KEYS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """One online-softmax step over keys [start_n, start_n + BLOCK_N). Invariant: acc / row_sum
    is the attention output over the keys seen so far, and row_max bounds their scaled scores
    (log2 units). MASK_KEYS: the block may run past `tokens` (then it holds at least one key)."""
    offs_n = tl.arange(0, BLOCK_N)
    if MASK_KEYS:
        valid = (start_n + offs_n) < tokens
        k = tl.load(k_ptrs + start_n * stride_k_token, mask=valid[:, None], other=0.0)
        v = tl.load(v_ptrs + start_n * stride_v_token, mask=valid[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs + start_n * stride_k_token)
        v = tl.load(v_ptrs + start_n * stride_v_token)
    scores = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
    if MASK_KEYS:
        scores = tl.where(valid[None, :], scores, float("-inf"))
    # The scores stay unscaled: qk_scale > 0, so the scaled max is the max scaled, and the scale
    # joins the subtraction in one FMA per score (3% faster on an H200 than scaling first).
    # Every block has a valid key, so new_max is finite and exp2(-inf - new_max) = 0 at start.
    new_max = tl.maximum(row_max, tl.max(scores, 1) * qk_scale)
    probs = tl.exp2(scores * qk_scale - new_max[:, None])
    correction = tl.exp2(row_max - new_max)
    row_sum = row_sum * correction + tl.sum(probs, 1)
    acc = acc * correction[:, None]
    acc = tl.dot(probs.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
    return acc, new_max, row_sum


@triton.jit
def _vit_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    qk_scale,  # softmax scale * log2(e)
    stride_q_tile,
    stride_q_token,
    stride_q_head,
    stride_k_tile,
    stride_k_token,
    stride_k_head,
    stride_v_tile,
    stride_v_token,
    stride_v_head,
    stride_o_tile,
    stride_o_token,
    stride_o_head,
    # A compile-time token count: it is fixed per model (tile size), so the key loop's trip
    # count and its masked tail are resolved at compile time. (Triton 3.6's interpreter under
    # numpy >= 2.4 also cannot loop to a run-time bound.)
    TOKENS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TAIL_M: tl.constexpr,
    TAIL_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    block = tl.program_id(0)
    head = tl.program_id(1)
    # 64-bit tile offsets: a large batch of tiles can pass 2**31 elements.
    tile = tl.program_id(2).to(tl.int64)
    q_base = q_ptr + tile * stride_q_tile + head * stride_q_head
    k_base = k_ptr + tile * stride_k_tile + head * stride_k_head
    v_base = v_ptr + tile * stride_v_tile + head * stride_v_head
    o_base = out_ptr + tile * stride_o_tile + head * stride_o_head
    start_m = block * BLOCK_M
    # The last query block, when few of its rows are tokens, runs as a TAIL_M-row block.
    if TAIL_M < BLOCK_M and block == tl.num_programs(0) - 1:
        _attend_query_block(
            q_base, k_base, v_base, o_base, qk_scale, start_m,
            stride_q_token, stride_k_token, stride_v_token, stride_o_token,
            TOKENS, HEAD_DIM, TAIL_M, BLOCK_N, TAIL_N, INPUT_PRECISION,
        )  # fmt: skip
    else:
        _attend_query_block(
            q_base, k_base, v_base, o_base, qk_scale, start_m,
            stride_q_token, stride_k_token, stride_v_token, stride_o_token,
            TOKENS, HEAD_DIM, BLOCK_M, BLOCK_N, TAIL_N, INPUT_PRECISION,
        )  # fmt: skip


@triton.jit
def _attend_query_block(
    q_base,
    k_base,
    v_base,
    o_base,
    qk_scale,
    start_m,
    stride_q_token,
    stride_k_token,
    stride_v_token,
    stride_o_token,
    TOKENS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TAIL_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Output rows [start_m, start_m + BLOCK_M) of one (tile, head), those past TOKENS neither
    read nor written: full BLOCK_N-key blocks, then the keys left (if any) as one masked
    TAIL_N-key block (TAIL_N <= BLOCK_N holds them all)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows_valid = (offs_m < TOKENS)[:, None]
    q_ptrs = q_base + offs_m[:, None] * stride_q_token + offs_d[None, :]
    q = tl.load(q_ptrs, mask=rows_valid, other=0.0)

    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    k_ptrs = k_base + offs_n[:, None] * stride_k_token + offs_d[None, :]
    v_ptrs = v_base + offs_n[:, None] * stride_v_token + offs_d[None, :]
    full_end: tl.constexpr = (TOKENS // BLOCK_N) * BLOCK_N
    for start_n in range(0, full_end, BLOCK_N):
        acc, row_max, row_sum = _attend_key_block(
            acc, row_max, row_sum, q, k_ptrs, v_ptrs, start_n, TOKENS,
            stride_k_token, stride_v_token, qk_scale, BLOCK_N, False, INPUT_PRECISION,
        )  # fmt: skip
    if full_end < TOKENS:
        offs_t = tl.arange(0, TAIL_N)
        k_tail = k_base + offs_t[:, None] * stride_k_token + offs_d[None, :]
        v_tail = v_base + offs_t[:, None] * stride_v_token + offs_d[None, :]
        acc, row_max, row_sum = _attend_key_block(
            acc, row_max, row_sum, q, k_tail, v_tail, full_end, TOKENS,
            stride_k_token, stride_v_token, qk_scale, TAIL_N, True, INPUT_PRECISION,
        )  # fmt: skip
    out = acc / row_sum[:, None]
    o_ptrs = o_base + offs_m[:, None] * stride_o_token + offs_d[None, :]
    tl.store(o_ptrs, out.to(o_base.dtype.element_ty), mask=rows_valid)
