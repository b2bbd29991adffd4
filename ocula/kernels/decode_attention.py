"""Paged attention for one new token per sequence (decode), flash-decoding style.

`decode_attention` agrees with `ocula.attention.reference.paged_attention_reference` on the
sequences whose query length is 1: sequence b's query is row query_start_loc[b] of q, at position
seq_lens[b] - 1, and sees every key of its context (the last `sliding_window` of them when set).
Sequences with another query length are skipped, their rows of `out` left as they are, so a mixed
batch can run its prefill chunks through `prefill_attention(..., skip_decode_rows=True)` and its
decodes here, into one output.

Work split: program (split, kv head, sequence) serves all GROUP query heads that share the KV head
(one load of a K/V block feeds them all through `tl.dot`), over one of `num_splits` equal, block-
aligned slices of the visible keys. Slices are computed on the device from seq_lens, so a short
context leaves some splits empty; each split writes its running max, sum and unnormalized
accumulator (float32) to scratch, and a second kernel merges the splits of each (sequence, head).
With one split the first kernel writes the output itself and the merge is skipped.

Given this step's tokens unrotated (`new_tokens`, a step of decodes only), the first kernel also
does `rotate_and_store_kv`'s work: every program rotates its query heads in registers, and the
one program whose keys include the new token rotates and stores its K and V into the caches,
then reads them back like any other key. Under programmatic dependent launch the step's metadata
(query starts, context lengths, table rows, positions) is read before the wait: it is written
before the step's first kernel, never by the kernel just before this one.

CUDA graphs: nothing here reads a device tensor on the host or branches on one; the grid, the
block sizes and `num_splits` are functions of host values only (tensor shapes, `max_context_len`,
the window), and scratch comes from torch.empty. The result is correct for any seq_lens whatever
`max_context_len` says: the bound only picks `num_splits`, i.e. how much parallelism a long
context gets. A sequence with seq_lens[b] == 0 (a padded row) gets zeros.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ocula.kernels import launch_with_pdl
from ocula.kernels.decode_split import decode_split_kernel
from ocula.kernels.prefill_attention import checked_output, padded_head_dim
from ocula.kernels.rotary_store import NewTokens, check_new_tokens

# A split should cover at least this many keys, or its fixed cost (query load, scratch write,
# merge) outweighs the keys it reads.
MIN_KEYS_PER_SPLIT = 256
MAX_SPLITS = 32
# About four waves of (sequence, KV head, split) programs on a 132-SM GPU; past that, splitting a
# context further only adds merge work.
TARGET_PROGRAMS = 512


def decode_num_splits(max_context_len: int, num_seqs: int, num_kv_heads: int) -> int:
    """Splits per (sequence, KV head): a power of two in [1, MAX_SPLITS], a pure function of host
    values. Grows with the context bound (MIN_KEYS_PER_SPLIT keys per split) until the batch has
    about TARGET_PROGRAMS programs."""
    by_length = triton.next_power_of_2(max(1, triton.cdiv(max_context_len, MIN_KEYS_PER_SPLIT)))
    parallel = max(1, num_seqs * num_kv_heads)
    by_occupancy = 1 << max(0, (TARGET_PROGRAMS // parallel).bit_length() - 1)
    return max(1, min(by_length, MAX_SPLITS, by_occupancy))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_table: torch.Tensor,
    table_rows: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_context_len: int,
    sliding_window: int | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    out: torch.Tensor | None = None,
    new_tokens: NewTokens | None = None,
) -> torch.Tensor:
    """Attention of the single new token of each decode sequence (see the module docstring).

    q: [T, num_heads, head_dim], any strides. k_cache, v_cache: [num_slots + 1, num_kv_heads,
    head_dim], q's dtype. slot_table: [rows, width] int32; table_rows: [B] int64;
    query_start_loc: [B + 1] int32; seq_lens: [B] int32 (context length including the new token).
    `max_context_len` is a host-side bound used only to choose `num_splits` when it is None;
    `num_splits` must be a power of two. Writes into `out` ([T, num_heads, head_dim], q's dtype;
    a new tensor when None) and returns it. `block_n` overrides the key block (power of two
    >= 16); leave it None outside tests.

    With `new_tokens`, q is not rotated yet and this step's K/V are not in the caches: the kernel
    does what `ocula.kernels.rotary_store.rotate_and_store_kv` would have done first (q is not
    modified; its rotation is used in registers), bit for bit. Every sequence must then have one
    new token (a step of decodes only): another's K/V would not be stored.
    """
    out = checked_output(q, k_cache, v_cache, slot_table, seq_lens, sliding_window, out)
    if new_tokens is not None:
        check_new_tokens(q, k_cache, v_cache, new_tokens)
    num_heads, head_dim = q.shape[1:]
    num_seqs, num_kv_heads = seq_lens.shape[0], k_cache.shape[1]
    if num_splits is None:
        num_splits = decode_num_splits(max_context_len, num_seqs, num_kv_heads)
    if num_splits < 1 or num_splits & (num_splits - 1):
        raise ValueError(f"num_splits must be a power of two, got {num_splits}")
    if num_seqs == 0 or q.shape[0] == 0:
        return out
    head_dim_pad = padded_head_dim(head_dim)
    pdl = launch_with_pdl(q)
    wide = q.element_size() == 4  # fp32 tiles take twice the shared memory per pipeline stage
    # partials[b, h, s, :head_dim] is a split's unnormalized accumulator, [head_dim] its running
    # max, [head_dim + 1] its running sum. With one split it is unused and `out` stands in.
    partials = out
    if num_splits > 1:
        shape = (num_seqs, num_heads, num_splits, head_dim + 2)
        partials = torch.empty(shape, dtype=torch.float32, device=q.device)
    decode_split_kernel[(num_splits, num_kv_heads, num_seqs)](
        q,
        k_cache,
        v_cache,
        slot_table,
        table_rows,
        query_start_loc,
        seq_lens,
        out,
        partials,
        *(
            (rope.k, rope.v, rope.positions, rope.slots, rope.cos_table, rope.sin_table)
            if (rope := new_tokens)
            else (q,) * 6
        ),
        scale * math.log2(math.e),
        sliding_window or 0,
        *q.stride(),
        *k_cache.stride()[:2],
        *slot_table.stride(),
        *out.stride()[:2],
        *partials.stride()[:3],
        *(new_tokens.k.stride()[:2] if new_tokens else (0, 0)),
        new_tokens.cos_table.stride(0) if new_tokens else 0,
        GROUP=num_heads // num_kv_heads,
        GROUP_PAD=max(16, triton.next_power_of_2(num_heads // num_kv_heads)),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad,
        NUM_SPLITS=num_splits,
        BLOCK_N=block_n or (64 if head_dim_pad <= 128 else 32),
        USE_WINDOW=sliding_window is not None,
        INPUT_PRECISION="ieee" if wide else "tf32",
        PDL=pdl,
        ROTATE=new_tokens is not None,
        NO_CONTRACT=q.is_cuda,
        num_warps=4,
        num_stages=2 if wide else 3,
        launch_pdl=pdl,
    )
    if num_splits > 1:
        _decode_merge_kernel[(num_seqs, num_heads)](
            out,
            partials,
            query_start_loc,
            *out.stride()[:2],
            *partials.stride()[:3],
            HEAD_DIM=head_dim,
            HEAD_DIM_PAD=head_dim_pad,
            NUM_SPLITS=num_splits,
            PDL=pdl,
            num_warps=2,
            launch_pdl=pdl,
        )
    return out


@triton.jit
def _decode_merge_kernel(
    out_ptr,
    partials_ptr,
    query_start_loc_ptr,
    stride_o_token,
    stride_o_head,  # out's last stride is 1
    stride_p_seq,
    stride_p_head,
    stride_p_split,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr,  # power of two
    PDL: tl.constexpr,
):
    """out[row of b, h] = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s with M = max_s m_s;
    empty splits (m_s = -inf) weigh 0, and a sequence with no keys at all gets zeros."""
    if PDL:  # see ocula.kernels.launch_with_pdl
        gdc_wait()
        gdc_launch_dependents()
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    q_row = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) - q_row != 1:
        return
    offs_s = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    dim_valid = offs_d < HEAD_DIM
    p_ptrs = partials_ptr + seq * stride_p_seq + head * stride_p_head + offs_s * stride_p_split
    split_max = tl.load(p_ptrs + HEAD_DIM)
    split_sum = tl.load(p_ptrs + HEAD_DIM + 1)
    split_acc = tl.load(p_ptrs[:, None] + offs_d[None, :], mask=dim_valid[None, :], other=0.0)
    global_max = tl.max(split_max, 0)
    safe_max = tl.where(global_max == float("-inf"), 0.0, global_max)
    weight = tl.exp2(split_max - safe_max)
    total = tl.sum(weight * split_sum, 0)
    out = tl.sum(weight[:, None] * split_acc, 0) / tl.where(total > 0, total, 1.0)
    o_ptrs = out_ptr + q_row.to(tl.int64) * stride_o_token + head * stride_o_head
    tl.store(o_ptrs + offs_d, out.to(out_ptr.dtype.element_ty), mask=dim_valid)
