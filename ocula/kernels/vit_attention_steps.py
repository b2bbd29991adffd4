"""The online-softmax steps of the ViT attention kernel (`vit_attention.py`): a block of keys on
the tensor cores, and the row-by-row steps for short tails, on the CUDA cores.

Invariant of every step over a query block: acc / row_sum is the attention output over the keys
seen so far, and row_max bounds their scaled scores (log2 units: qk_scale = softmax scale *
log2(e), positive)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def attend_key_block(
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
    """One online-softmax step over keys [start_n, start_n + BLOCK_N). MASK_KEYS: the block may
    run past `tokens` (then it holds at least one key)."""
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
def attend_one_key(
    acc, row_max, row_sum, q, k_base, v_base, key, stride_k_token, stride_v_token, qk_scale, offs_d
):
    """The online-softmax step of `attend_key_block` for the single key `key`, on the CUDA
    cores: a product and a sum per query instead of a 64-key block of tensor-core work."""
    k = tl.load(k_base + key * stride_k_token + offs_d).to(tl.float32)
    v = tl.load(v_base + key * stride_v_token + offs_d)
    scores = tl.sum(q.to(tl.float32) * k[None, :], 1)
    new_max = tl.maximum(row_max, scores * qk_scale)
    probs = tl.exp2(scores * qk_scale - new_max)
    correction = tl.exp2(row_max - new_max)
    row_sum = row_sum * correction + probs
    # Rounded to the inputs' dtype as the block step's P @ V operand is.
    weighted = probs.to(v.dtype).to(tl.float32)[:, None] * v.to(tl.float32)[None, :]
    acc = acc * correction[:, None] + weighted
    return acc, new_max, row_sum


@triton.jit
def attend_one_query(
    q_row_ptr,
    k_base,
    v_base,
    o_row_ptr,
    stride_k_token,
    stride_v_token,
    qk_scale,
    TOKENS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One query's attention over all the tile's keys, on the CUDA cores, stored at o_row_ptr:
    the same online softmax as the query blocks', for a row past the last full block."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_row_ptr + offs_d).to(tl.float32)
    row_max = tl.full([1], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, TOKENS, BLOCK_N):
        keys = start_n + offs_n
        valid = keys < TOKENS
        k = tl.load(
            k_base + keys[:, None] * stride_k_token + offs_d[None, :],
            mask=valid[:, None],
            other=0.0,
        )
        v = tl.load(
            v_base + keys[:, None] * stride_v_token + offs_d[None, :],
            mask=valid[:, None],
            other=0.0,
        )
        scores = tl.sum(k.to(tl.float32) * q[None, :], 1)
        scores = tl.where(valid, scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 0) * qk_scale)
        probs = tl.exp2(scores * qk_scale - new_max)
        correction = tl.exp2(row_max - new_max)
        row_sum = row_sum * correction + tl.sum(probs, 0)
        weighted = probs.to(v.dtype).to(tl.float32)[:, None] * v.to(tl.float32)
        acc = acc * correction + tl.sum(weighted, 0)
        row_max = new_max
    tl.store(o_row_ptr + offs_d, (acc / row_sum).to(o_row_ptr.dtype.element_ty))
