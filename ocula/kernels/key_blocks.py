"""The online-softmax loop over a block-aligned range of one sequence's paged keys, shared by the
prefill and decode attention kernels."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def attend_key_range(
    acc,
    row_max,
    row_sum,
    q,
    q_pos,
    start,
    end,
    table_ptrs,
    stride_table_col,
    k_head_ptr,
    v_head_ptr,
    stride_kv_slot,
    dim_valid,
    qk_scale,
    window,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Online-softmax steps over the keys [start, end) of one sequence, BLOCK_N at a time from
    `start`, their slots read through `table_ptrs` (K/V rows at k_head_ptr / v_head_ptr + slot *
    stride_kv_slot); returns the updated (acc, row_max, row_sum).

    Invariant: acc / row_sum is each query row's output over the keys seen so far and row_max
    bounds their scaled scores (log2 units); a row that has seen no visible key has row_max = -inf
    and row_sum = 0. MASKED: keys at or past `end`, after the row's position `q_pos` or (with
    USE_WINDOW) at or before q_pos - window are hidden, and a row may see none of a block. Not
    MASKED: the caller guarantees end - start is a multiple of BLOCK_N and every row sees every key.
    """
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if MASKED:
            key_valid = offs_n < end
            # Hidden keys read no slot (other=0: the scratch slot's address) and no K/V.
            slots = tl.load(table_ptrs + offs_n * stride_table_col, mask=key_valid, other=0)
            kv_mask = key_valid[:, None] & dim_valid[None, :]
        else:
            slots = tl.load(table_ptrs + offs_n * stride_table_col)
            kv_mask = dim_valid[None, :]
        slots = slots.to(tl.int64)[:, None]
        k = tl.load(k_head_ptr + slots * stride_kv_slot, mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=INPUT_PRECISION) * qk_scale
        if MASKED:
            visible = key_valid[None, :] & (offs_n[None, :] <= q_pos[:, None])
            if USE_WINDOW:
                visible = visible & (offs_n[None, :] > q_pos[:, None] - window)
            scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        # MASKED: a row with no visible key yet keeps -inf; subtracting 0 keeps its probs at 0.
        new_max_or_0 = tl.where(new_max == float("-inf"), 0.0, new_max) if MASKED else new_max
        probs = tl.exp2(scores - new_max_or_0[:, None])
        correction = tl.exp2(row_max - new_max_or_0)
        row_sum = row_sum * correction + tl.sum(probs, 1)
        v = tl.load(v_head_ptr + slots * stride_kv_slot, mask=kv_mask, other=0.0)
        acc = acc * correction[:, None]
        acc = tl.dot(probs.to(q.dtype), v.to(q.dtype), acc, input_precision=INPUT_PRECISION)
        row_max = new_max
    return acc, row_max, row_sum


# skip_decode_rows is a runtime flag, not a constexpr, and exempt from Triton's specialization on
# the value 1: a mixed batch (prefill chunks beside decodes) then runs the kernels compiled at
# start-up for prefills alone instead of compiling a variant of its own on first use (1.5 s on an
# H200, inside a request's latency).
