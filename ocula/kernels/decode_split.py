"""The first kernel of `ocula.kernels.decode_attention`: one split of one sequence's keys for the
query heads of one KV head (see that module for the work split and its contracts)."""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ocula.kernels.key_blocks import attend_key_range
from ocula.kernels.rotary import position_cos_sin, rotated_heads


@triton.jit
def decode_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    slot_table_ptr,
    table_rows_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    out_ptr,  # written only when NUM_SPLITS == 1
    partials_ptr,  # [B, H, NUM_SPLITS, HEAD_DIM + 2] fp32, unit last stride; NUM_SPLITS > 1
    new_k_ptr,  # ROTATE: the new tokens' k and v rows [T, KV heads, HEAD_DIM], unrotated
    new_v_ptr,
    positions_ptr,  # ROTATE: [T] positions and out slots of the new tokens
    out_slots_ptr,
    cos_ptr,  # ROTATE: float32 RoPE tables [positions, HEAD_DIM / 2]
    sin_ptr,
    qk_scale,  # softmax scale * log2(e)
    window,  # sliding window, read only when USE_WINDOW
    stride_q_token,
    stride_q_head,
    stride_q_dim,
    stride_kv_slot,  # k_cache and v_cache share strides; their last stride is 1
    stride_kv_head,
    stride_table_row,
    stride_table_col,
    stride_o_token,
    stride_o_head,  # out's last stride is 1
    stride_p_seq,
    stride_p_head,
    stride_p_split,
    stride_new_token,  # new_k and new_v share strides; their last stride is 1
    stride_new_head,
    stride_table_position,
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_PAD: tl.constexpr,  # power of two >= max(GROUP, 16): tl.dot's row count
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    PDL: tl.constexpr,
    ROTATE: tl.constexpr,  # q, new_k are unrotated; rotate them, store new_k/new_v (see wrapper)
    NO_CONTRACT: tl.constexpr,
):
    split = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.program_id(2).to(tl.int64)
    # The step's metadata is read before the PDL wait (see ocula.kernels.launch_with_pdl).
    q_row = tl.load(query_start_loc_ptr + seq)
    other_query_len = tl.load(query_start_loc_ptr + seq + 1) - q_row != 1  # not a decode
    q_row = q_row.to(tl.int64)
    ctx_len = tl.load(seq_lens_ptr + seq)
    table_row = tl.load(table_rows_ptr + seq).to(tl.int64)
    if ROTATE:
        dtype = q_ptr.dtype.element_ty
        position = tl.load(positions_ptr + q_row)
        cos, sin = position_cos_sin(
            position, cos_ptr, sin_ptr, stride_table_position, dtype, HEAD_DIM // 2, HEAD_DIM_PAD
        )
    if PDL:  # see ocula.kernels.launch_with_pdl
        gdc_wait()
        gdc_launch_dependents()
    if other_query_len:
        return
    # Visible keys are [lo, ctx_len); split s takes the block-aligned slice [start, end) of them.
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(ctx_len - window, 0)
    split_len = tl.cdiv(tl.cdiv(ctx_len - lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = lo + split * split_len
    end = tl.minimum(start + split_len, ctx_len)

    offs_g = tl.arange(0, GROUP_PAD)
    head_valid = offs_g < GROUP
    heads = kv_head * GROUP + offs_g
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    dim_valid = offs_d < HEAD_DIM
    tile_mask = head_valid[:, None] & dim_valid[None, :]
    if ROTATE:
        q_heads = q_ptr + q_row * stride_q_token + heads * stride_q_head
        q = rotated_heads(q_heads, head_valid, cos, sin, HEAD_DIM // 2, HEAD_DIM_PAD, NO_CONTRACT)
        # The one program whose keys include this step's stores its rotated K and V, then reads
        # them back through the cache like every other key (the barrier makes its own writes
        # visible to all its threads), so the key loop below is the plain one. CUDA-graph
        # padding rows all store to and read the scratch slot 0; they are identical (same
        # inputs), so which one's store a padding row reads does not matter, and no real row
        # reads slot 0.
        owner = (start <= ctx_len - 1) & (ctx_len - 1 < end)
        new_row = q_row * stride_new_token + kv_head * stride_new_head
        new_k = rotated_heads(
            new_k_ptr + new_row + tl.zeros([1], tl.int64), tl.full([1], 0, tl.int1) | owner,
            cos, sin, HEAD_DIM // 2, HEAD_DIM_PAD, NO_CONTRACT,
        )  # fmt: skip
        row_mask = owner & dim_valid[None, :]
        new_v = tl.load(new_v_ptr + new_row + offs_d[None, :], mask=row_mask, other=0.0)
        slot = tl.load(out_slots_ptr + q_row, mask=owner, other=0).to(tl.int64)
        cached = slot * stride_kv_slot + kv_head * stride_kv_head + offs_d[None, :]
        tl.store(k_ptr + cached, new_k.to(k_ptr.dtype.element_ty), mask=row_mask)
        tl.store(v_ptr + cached, new_v.to(v_ptr.dtype.element_ty), mask=row_mask)
        tl.debug_barrier()
    else:
        q_ptrs = q_ptr + q_row * stride_q_token + heads[:, None] * stride_q_head
        q = tl.load(q_ptrs + offs_d[None, :] * stride_q_dim, mask=tile_mask, other=0.0)
    table_ptrs = slot_table_ptr + table_row * stride_table_row
    k_head_ptr = k_ptr + kv_head * stride_kv_head + offs_d[None, :]
    v_head_ptr = v_ptr + kv_head * stride_kv_head + offs_d[None, :]
    row_max = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], dtype=tl.float32)
    # Every key of [start, end) is visible to every head: whole blocks skip the masks, and only
    # the tail block masks keys past `end` (q_pos = ctx_len - 1 hides nothing else).
    full_end = start + ((end - start) // BLOCK_N) * BLOCK_N
    q_pos = tl.zeros([GROUP_PAD], dtype=tl.int32) + ctx_len - 1
    acc, row_max, row_sum = attend_key_range(
        acc, row_max, row_sum, q, q_pos, start, full_end, table_ptrs, stride_table_col,
        k_head_ptr, v_head_ptr, stride_kv_slot, dim_valid, qk_scale, window,
        BLOCK_N, False, False, INPUT_PRECISION,
    )  # fmt: skip
    acc, row_max, row_sum = attend_key_range(
        acc, row_max, row_sum, q, q_pos, full_end, end, table_ptrs, stride_table_col,
        k_head_ptr, v_head_ptr, stride_kv_slot, dim_valid, qk_scale, window,
        BLOCK_N, True, False, INPUT_PRECISION,
    )  # fmt: skip

    if NUM_SPLITS == 1:
        out = acc / tl.where(row_sum > 0, row_sum, 1.0)[:, None]
        o_ptrs = out_ptr + q_row * stride_o_token + heads[:, None] * stride_o_head
        tl.store(o_ptrs + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=tile_mask)
    else:
        p_ptrs = partials_ptr + seq * stride_p_seq + heads * stride_p_head + split * stride_p_split
        tl.store(p_ptrs[:, None] + offs_d[None, :], acc, mask=tile_mask)
        tl.store(p_ptrs + HEAD_DIM, row_max, mask=head_valid)
        tl.store(p_ptrs + HEAD_DIM + 1, row_sum, mask=head_valid)
