"""Causal attention over the paged KV cache for a varlen batch: prefill chunks and decodes mixed.

`prefill_attention` computes what `ocula.attention.reference.paged_attention_reference` computes,
in one launch: sequence b owns query rows [query_start_loc[b], query_start_loc[b + 1]) and
seq_lens[b] tokens of context (this step's K/V already in the token-granular caches), token j at
slot slot_table[table_rows[b], j]. New token i sits at position seq_lens[b] - query_len + i and
sees keys 0..position (causal), only those above position - sliding_window when one is set.

A flash-attention forward: program (query block, head, sequence) owns BLOCK_M new tokens of one
head, gathers BLOCK_N keys at a time through the slot table, multiplies with `tl.dot` into
float32 and keeps an online softmax in float32 (exp2, the scale folded into log2(e)). It walks only
the keys some row of its block sees (window start of its first query, or 0, up to its last
query), and skips the masks on the blocks every row sees. The grid has cdiv(max_query_len,
BLOCK_M) blocks per sequence from a host-side bound; blocks past a sequence's length exit at once,
so the launch reads nothing back. A decode row costs a whole BLOCK_M block here: a batch with
decodes can run them GQA-packed through `decode_attention` and skip them here (`skip_decode_rows`).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ocula.kernels.key_blocks import attend_key_range

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Query chunks up to SHORT_CHUNK_QUERIES long launch 16-query x 128-key blocks, up to
# WIDE_KEY_QUERIES 64 x 128 (see `_launch_config`), while SHORT_CHUNK_BLOCKS is on; the
# benchmarks' `--switches short_chunk_blocks=off` turns both off for an A/B (the rule before:
# up to 64 queries over 64 keys).
SHORT_CHUNK_QUERIES = 128
WIDE_KEY_QUERIES = 256
SHORT_CHUNK_BLOCKS = True


def padded_head_dim(head_dim: int) -> int:
    """The power-of-two width (>= 16, tl.dot's minimum) the kernels compute head_dim in."""
    return max(16, triton.next_power_of_2(head_dim))


def checked_output(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_table: torch.Tensor,
    seq_lens: torch.Tensor,
    sliding_window: int | None,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """Checks the paged kernels' inputs (host metadata only) and returns `out`, or a new tensor
    shaped like q when it is None."""
    shapes = f"q {tuple(q.shape)}, caches {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
    if q.dim() != 3 or k_cache.dim() != 3 or k_cache.shape != v_cache.shape:
        raise ValueError(f"need q [T, heads, dim] and caches [slots, kv_heads, dim]; got {shapes}")
    if q.shape[2] != k_cache.shape[2] or q.shape[1] % k_cache.shape[1] != 0:
        raise ValueError(f"query heads cannot share the KV heads evenly: {shapes}")
    if q.dtype not in SUPPORTED_DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q and the caches must share one of {SUPPORTED_DTYPES}")
    if slot_table.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        raise ValueError("slot_table and seq_lens must be int32")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must share strides, with a unit last stride")
    if len({t.device for t in (q, k_cache, v_cache, slot_table, seq_lens)}) != 1:
        raise ValueError("q, the caches and the batch metadata must be on one device")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be None or >= 1, got {sliding_window}")
    if out is None:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if (out.shape, out.dtype, out.device) != (q.shape, q.dtype, q.device) or out.stride(-1) != 1:
        raise ValueError("out must have q's shape, dtype and device, and a unit last stride")
    return out


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_table: torch.Tensor,
    table_rows: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_query_len: int,
    sliding_window: int | None = None,
    skip_decode_rows: bool = False,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Paged causal attention of every new token of a varlen batch (see the module docstring).

    q: [T, num_heads, head_dim], any strides. k_cache, v_cache: [num_slots + 1, num_kv_heads,
    head_dim], q's dtype. slot_table: [rows, width] int32; table_rows: [B] int64;
    query_start_loc: [B + 1] int32; seq_lens: [B] int32. `max_query_len` must be at least every
    sequence's query length (queries past it are never computed); it is a host value so the launch
    needs no sync. `skip_decode_rows`: sequences with one new token are left out (their rows of
    `out` untouched). Writes into `out` ([T, num_heads, head_dim], q's dtype; a new tensor when
    None) and returns it. `block_m` / `block_n` override the block sizes (powers of two, >= 16);
    leave them None outside tests.
    """
    out = checked_output(q, k_cache, v_cache, slot_table, seq_lens, sliding_window, out)
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0 or max_query_len <= 0:
        return out
    head_dim_pad = padded_head_dim(head_dim)
    config = _launch_config(max_query_len, head_dim_pad, q.element_size())
    default_m, default_n, num_warps, num_stages = config
    block_m = block_m or default_m
    block_n = block_n or default_n
    grid = (triton.cdiv(max_query_len, block_m), num_heads, num_seqs)
    _prefill_attention_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        slot_table,
        table_rows,
        query_start_loc,
        seq_lens,
        scale * math.log2(math.e),
        sliding_window or 0,
        *q.stride(),
        *k_cache.stride()[:2],
        *out.stride()[:2],
        *slot_table.stride(),
        int(skip_decode_rows),
        GROUP=num_heads // k_cache.shape[1],
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        USE_WINDOW=sliding_window is not None,
        # fp32 inputs keep full precision on tensor cores (no tf32); 16-bit inputs ignore it.
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


def _launch_config(max_query_len: int, head_dim_pad: int, element_size: int) -> tuple[int, ...]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages), tuned on an H100 (bf16, head_dim 128): long
    chunks take 128 x 128 tiles in three stages (~310 TFLOP/s, against ~230 for 128 x 64 in two).
    Shorter chunks fill fewer programs than the GPU has SMs (one per query block and head), so
    their keys go in 128-wide blocks, half the steps of 64: chunks of up to SHORT_CHUNK_QUERIES
    (a follow-up question, a short prompt, the whole-step graphs of the 16-128 token buckets)
    with 16-query blocks, 4-8 times the programs; up to WIDE_KEY_QUERIES with 64-query blocks.
    Measured with benchmarks/profile_prefill_blocks.py (Qwen2.5-7B's heads, 28 layers in a CUDA
    graph, L2 flushed before each call; us per call against the 64 x 64 before): 60 queries
    over 390 keys 12.2 / 18.2, over 8,000 135 / 221; 30 over 2,000 37.5 / 60.7; 120 over 500
    14.4 / 19.7, over 120 6.9 / 8.8 (none faster with 32 or 64 queries a block); with 64 x 128,
    160 over 2,000 42.5 / 61.1, 250 over 600 18.1 / 23.5, over 4,000 78 / 116, 200 over 8,000
    146 / 225, 200 or 250 with no prefix 11.5-11.8 / 11.9-12.5, 160 with none 10.8 / 10.3.
    From 257 queries 64 x 64 is the fastest, prefix or not (330 with none 16.1 against 18.7 for
    64 x 128; 480 over 4,000 119 against 144). fp32 tiles need half the stages of shared
    memory."""
    if head_dim_pad <= 128 and element_size == 2:
        if max_query_len >= 512:
            return 128, 128, 8, 3
        if SHORT_CHUNK_BLOCKS and max_query_len <= SHORT_CHUNK_QUERIES:
            return 16, 128, 4, 3
        if SHORT_CHUNK_BLOCKS and max_query_len <= WIDE_KEY_QUERIES:
            return 64, 128, 4, 3
    block_m = min(64, max(16, triton.next_power_of_2(max_query_len)))
    return block_m, 64 if head_dim_pad <= 128 else 32, 4, 3 if element_size == 2 else 2


@triton.jit(do_not_specialize=["skip_decode_rows"])
def _prefill_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    slot_table_ptr,
    table_rows_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    qk_scale,  # softmax scale * log2(e)
    window,  # sliding window, read only when USE_WINDOW
    stride_q_token,
    stride_q_head,
    stride_q_dim,
    stride_kv_slot,  # k_cache and v_cache share strides; their last stride is 1
    stride_kv_head,
    stride_o_token,
    stride_o_head,  # out's last stride is 1
    stride_table_row,
    stride_table_col,
    skip_decode_rows,  # 1: sequences with one new token are left to the decode kernel
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,  # power of two >= max(HEAD_DIM, 16)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    q_block = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    done = (q_block * BLOCK_M >= q_len) | ((q_len == 1) & (skip_decode_rows != 0))
    if done:
        return
    ctx_len = tl.load(seq_lens_ptr + seq)
    table_row = tl.load(table_rows_ptr + seq).to(tl.int64)
    kv_head = head // GROUP

    offs_m = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = offs_m < q_len
    q_pos = ctx_len - q_len + offs_m  # position of each query row in its sequence
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    dim_valid = offs_d < HEAD_DIM
    tokens = (q_start + offs_m).to(tl.int64)
    q_ptrs = q_ptr + tokens[:, None] * stride_q_token + head * stride_q_head
    tile_mask = row_valid[:, None] & dim_valid[None, :]
    q = tl.load(q_ptrs + offs_d[None, :] * stride_q_dim, mask=tile_mask, other=0.0)

    # Keys [lo, hi) are those some row of this block sees: up to the last valid query's position,
    # from the first query's window start (rounded down to a block). Every block in between holds
    # a key some row sees; blocks in [full_lo, full_hi) are seen whole by every row.
    first_pos = ctx_len - q_len + q_block * BLOCK_M
    hi = tl.minimum(first_pos + BLOCK_M, ctx_len)
    lo = 0
    if USE_WINDOW:
        lo = (tl.maximum(first_pos - window + 1, 0) // BLOCK_N) * BLOCK_N
    full_hi = lo + ((first_pos + 1 - lo) // BLOCK_N) * BLOCK_N
    full_lo = lo
    if USE_WINDOW:
        # The last row (position hi - 1) sees keys from hi - window on.
        full_lo = lo + tl.cdiv(tl.maximum(hi - window - lo, 0), BLOCK_N) * BLOCK_N
        full_lo = tl.minimum(full_lo, full_hi)
    table_ptrs = slot_table_ptr + table_row * stride_table_row
    k_head_ptr = k_ptr + kv_head * stride_kv_head + offs_d[None, :]
    v_head_ptr = v_ptr + kv_head * stride_kv_head + offs_d[None, :]

    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    if USE_WINDOW:
        acc, row_max, row_sum = attend_key_range(
            acc, row_max, row_sum, q, q_pos, lo, full_lo, table_ptrs, stride_table_col,
            k_head_ptr, v_head_ptr, stride_kv_slot, dim_valid, qk_scale, window,
            BLOCK_N, True, USE_WINDOW, INPUT_PRECISION,
        )  # fmt: skip
    acc, row_max, row_sum = attend_key_range(
        acc, row_max, row_sum, q, q_pos, full_lo, full_hi, table_ptrs, stride_table_col,
        k_head_ptr, v_head_ptr, stride_kv_slot, dim_valid, qk_scale, window,
        BLOCK_N, False, USE_WINDOW, INPUT_PRECISION,
    )  # fmt: skip
    acc, row_max, row_sum = attend_key_range(
        acc, row_max, row_sum, q, q_pos, full_hi, hi, table_ptrs, stride_table_col,
        k_head_ptr, v_head_ptr, stride_kv_slot, dim_valid, qk_scale, window,
        BLOCK_N, True, USE_WINDOW, INPUT_PRECISION,
    )  # fmt: skip

    # Every valid row sees at least its own key, so row_sum > 0 there; padded rows are not stored.
    out = acc / tl.where(row_sum > 0, row_sum, 1.0)[:, None]
    o_ptrs = out_ptr + tokens[:, None] * stride_o_token + head * stride_o_head
    tl.store(o_ptrs + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=tile_mask)
