"""The ViT's bidirectional attention on Hopper: a persistent, warp-specialized Gluon kernel whose
softmax runs while the tensor cores compute the next key block's scores.

Same contract as `ocula.kernels.vit_attention.vit_attention` (q, k, v [tiles, tokens, heads,
head_dim] views of the qkv projection, output [tiles, tokens, heads * head_dim]), for head_dim
64, 16-bit inputs, at least 128 tokens a tile, and q, k, v whose tiles follow each other in one
row-major buffer (`hopper_attention_applies`).

Why: with 64-wide heads a score costs as much on the special-function unit (its exponential) as
on the tensor cores, so a kernel that runs them one after the other leaves either unit idle half
the time. Here each warpgroup issues the next block's Q K^T as an asynchronous wgmma, computes
the current block's softmax meanwhile, then issues P V (FlashAttention-3's intra-warpgroup
overlap), and the two warpgroups of a program interleave on the SM.

Layout of one program (one per SM, `maxnreg` split by `gl.warp_specialize`):
- a loader partition (4 warps, 40 registers; one thread issues the TMA copies) walks the
  program's work items (128 query rows of one (tile, head)): their Q block into one of two
  slots, then every key block's K and V into a ring of `KV_STAGES` slots (`ready` barriers carry
  the bytes, `empty` barriers, counting both consumers, return the slots), then the tail block
  (the `tokens % 128` last keys, rounded up to 16) into one of two tail slots;
- two consumer partitions (4 warps each, 232 registers) own query rows 0-63 and 64-127 of each
  item. Both read every K and V slot; each keeps its 64 x 128 score block, the next one in
  flight, and its 64 x 64 output accumulator in registers (P goes to the second wgmma as a
  register operand).

Numbers: as the Triton kernel: scores and sums in float32, the softmax in base 2 with
scale * log2(e) folded into one FMA per score, P rounded to the inputs' dtype before P V, and
the output divided by the row sum at the end. Keys of a tile's last block past its end (which
the 2-D TMA loads read from the next tile, or as zeros past the buffer) are masked to -inf;
their V rows meet probabilities of exactly zero. Query rows past a tile's end are computed and
never stored.
"""

from __future__ import annotations

import functools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ocula.kernels import hopper_or_later

HOPPER_ATTENTION_DTYPES = (torch.bfloat16, torch.float16)
HEAD_DIM = 64
BLOCK_M = 128  # query rows of a work item: two consumer warpgroups of 64
BLOCK_N = 128  # keys of a full block
WARPGROUP_TURNS = True  # the consumers issue their MMAs in turns (`_await_turn`)
KV_STAGES = 3  # 3 x 32 KB of K and V slots + 2 x 16 KB of Q slots + 2 x 4 KB of tail slots
CONSUMER_REGISTERS = gl.constexpr(232)
KERNEL_MAX_REGISTERS = 168  # 232 + 232 + 40 = 3 x 168 a thread (the loader keeps 40)
SCORE_FLOOR = gl.constexpr(float("-inf"))


def tail_keys(tokens: int) -> int:
    """Rows of the tail block, for the keys past the last full block: a power of two (a TMA
    block's) of at least 16 (a wgmma step's); 0 when there are none."""
    tail = tokens % BLOCK_N
    return 0 if tail == 0 else max(16, 1 << (tail - 1).bit_length())


@gluon.jit
def _item_rows(item, heads, TOKENS: gl.constexpr, Q_BLOCKS: gl.constexpr):
    """(first query row, first key row, head) of work item `item`; items run query block
    fastest, then head, then tile, so the programs at work share a few tiles' keys in L2."""
    q_block = item % Q_BLOCKS
    head = (item // Q_BLOCKS) % heads
    tile = item // (Q_BLOCKS * heads)
    key_row = tile * TOKENS
    return key_row + q_block * 128, key_row, head


@gluon.jit
def _loader(descs, smem, bars, num_items, heads, TOKENS: gl.constexpr, STAGES: gl.constexpr):
    q_desc, k_desc, v_desc, kt_desc, vt_desc = descs
    q_slots, k_slots, v_slots, kt_slots, vt_slots = smem
    q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, t_ready, t_empty, _ = bars
    BN: gl.constexpr = k_desc.block_type.shape[0]
    D: gl.constexpr = k_desc.block_type.shape[1]
    FULL_BLOCKS: gl.constexpr = TOKENS // BN
    Q_BLOCKS: gl.constexpr = (TOKENS + q_desc.block_type.shape[0] - 1) // q_desc.block_type.shape[0]
    for item in range(gl.program_id(0), num_items, gl.num_programs(0)):
        q_row, key_row, head = _item_rows(item, heads, TOKENS, Q_BLOCKS)
        local = (item - gl.program_id(0)) // gl.num_programs(0)  # this program's items before
        seq = local * FULL_BLOCKS  # and their full key blocks
        column = head * D
        pair = local % 2
        pair_phase = (local // 2) & 1
        # Slots start free: the first round waits on the phase before the first.
        mbarrier.wait(q_empty.index(pair), pair_phase ^ 1)
        mbarrier.expect(q_ready.index(pair), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(
            q_desc, [q_row, column], q_ready.index(pair), q_slots.index(pair)
        )
        for block in range(FULL_BLOCKS):
            slot = seq % STAGES
            phase = ((seq // STAGES) & 1) ^ 1
            row = key_row + block * BN
            mbarrier.wait(k_empty.index(slot), phase)
            mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(
                k_desc, [row, column], k_ready.index(slot), k_slots.index(slot)
            )
            mbarrier.wait(v_empty.index(slot), phase)
            mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(
                v_desc, [row, column], v_ready.index(slot), v_slots.index(slot)
            )
            seq += 1
        if TOKENS % BN != 0:
            row = key_row + FULL_BLOCKS * BN
            mbarrier.wait(t_empty.index(pair), pair_phase ^ 1)
            bar = t_ready.index(pair)
            mbarrier.expect(bar, kt_desc.block_type.nbytes + vt_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(kt_desc, [row, column], bar, kt_slots.index(pair))
            tma.async_copy_global_to_shared(vt_desc, [row, column], bar, vt_slots.index(pair))


@gluon.jit
def _softmax_step(scores, m_i, l_i, qk_scale, row_layout: gl.constexpr):
    """Online softmax over one block of unscaled scores: (probabilities, rescale of the earlier
    sums, new running max, new running sum), in base 2. qk_scale > 0, so the scaled max is the
    max scaled and the scale joins the subtraction in one FMA a score."""
    block_max = gl.convert_layout(gl.max(scores, axis=1), row_layout)
    m_new = gl.maximum(m_i, block_max * qk_scale)
    m_cols = gl.convert_layout(m_new, gl.SliceLayout(1, scores.type.layout))
    p = gl.exp2(scores * qk_scale - gl.expand_dims(m_cols, 1))
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.convert_layout(gl.sum(p, axis=1), row_layout)
    return p, alpha, m_new, l_i


@gluon.jit
def _rescaled(acc, alpha):
    o_layout: gl.constexpr = acc.type.layout
    return acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)


@gluon.jit
def _await_turn(turns, event, HALF: gl.constexpr, TURNS: gl.constexpr):
    """With TURNS, the two consumers issue their tensor-core work in turns (FlashAttention-3's
    ping-pong): consumer 0's `event`-th issue waits for consumer 1's event before it, consumer
    1's for consumer 0's same event, so one's softmax runs while the other's MMAs do. Both
    count the same events an item, and neither can get two turns ahead (mbarrier parity)."""
    if TURNS:
        mbarrier.wait(turns.index(HALF), (event + 1 - HALF) & 1, pred=event + HALF > 0)


@gluon.jit
def _pass_turn(turns, HALF: gl.constexpr, TURNS: gl.constexpr):
    if TURNS:
        mbarrier.arrive(turns.index(1 - HALF))


@gluon.jit
def _scores_beside_pv(
    q, k, s_zero, acc, alpha, p_op, v, turns, event, HALF: gl.constexpr, TURNS: gl.constexpr
):  # fmt: skip
    """Issues a block's Q K^T, rescales the output (nothing in flight writes it) and issues the
    block before's P V, in this consumer's turn. Returns the scores once done, P V still in
    flight: the caller's softmax runs under it."""
    _await_turn(turns, event, HALF, TURNS)
    s_tok = warpgroup_mma(q, k, s_zero, use_acc=False, is_async=True)
    acc = _rescaled(acc, alpha)
    o_tok = warpgroup_mma(p_op, v, acc, is_async=True)
    _pass_turn(turns, HALF, TURNS)
    scores, _ = warpgroup_mma_wait(1, deps=(s_tok, k))
    return scores, o_tok


@gluon.jit
def _full_block(
    q, acc, p_op, alpha, m_i, l_i, seq, qk_scale, k_slots, v_slots, k_ready, k_empty, v_ready,
    v_empty, turns, event, STAGES: gl.constexpr, s_layout: gl.constexpr, HALF: gl.constexpr,
    TURNS: gl.constexpr,
):  # fmt: skip
    """Full key block `seq` (this program's count) with the block before's probabilities in
    `p_op` (FlashAttention-3's order): this block's Q K^T and the block before's P V go to the
    tensor cores together, and this block's softmax runs while P V does. Nothing stays in
    flight on return (ptxas serializes wgmma when an accumulator is live across the loop)."""
    slot = seq % STAGES
    before = (seq + STAGES - 1) % STAGES
    mbarrier.wait(k_ready.index(slot), (seq // STAGES) & 1)
    mbarrier.wait(v_ready.index(before), ((seq - 1) // STAGES) & 1)
    k = k_slots.index(slot).permute((1, 0))
    v = v_slots.index(before)
    ROWS: gl.constexpr = q.shape[0]
    BN: gl.constexpr = k_slots.shape[1]
    s_zero = gl.zeros([ROWS, BN], gl.float32, s_layout)
    scores, o_tok = _scores_beside_pv(q, k, s_zero, acc, alpha, p_op, v, turns, event, HALF, TURNS)
    mbarrier.arrive(k_empty.index(slot))
    p, alpha, m_i, l_i = _softmax_step(scores, m_i, l_i, qk_scale, gl.SliceLayout(1, s_layout))
    acc, _, _ = warpgroup_mma_wait(0, deps=(o_tok, v, p_op))
    mbarrier.arrive(v_empty.index(before))
    p_layout: gl.constexpr = p_op.type.layout
    p_op = gl.convert_layout(p.to(q.dtype), p_layout)
    return acc, p_op, alpha, m_i, l_i


@gluon.jit
def _consumer(
    out_ptr, out_stride, qk_scale, smem, bars, num_items, heads,
    HALF: gl.constexpr, TOKENS: gl.constexpr, STAGES: gl.constexpr, TURNS: gl.constexpr,
):  # fmt: skip
    q_slots, k_slots, v_slots, kt_slots, vt_slots = smem
    q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, t_ready, t_empty, turns = bars
    BN: gl.constexpr = k_slots.shape[1]
    D: gl.constexpr = k_slots.shape[2]
    TAIL: gl.constexpr = kt_slots.shape[1]
    HAS_TAIL: gl.constexpr = TOKENS % BN != 0
    BM: gl.constexpr = q_slots.shape[1]
    ROWS: gl.constexpr = BM // 2
    FULL_BLOCKS: gl.constexpr = TOKENS // BN
    Q_BLOCKS: gl.constexpr = (TOKENS + BM - 1) // BM
    EVENTS: gl.constexpr = FULL_BLOCKS + 1 + HAS_TAIL  # tensor-core turns an item
    dtype: gl.constexpr = q_slots.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16]
    )
    t_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, TAIL, 16]
    )
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16]
    )
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)

    for item in range(gl.program_id(0), num_items, gl.num_programs(0)):
        q_row, key_row, head = _item_rows(item, heads, TOKENS, Q_BLOCKS)
        local = (item - gl.program_id(0)) // gl.num_programs(0)  # this program's items before
        seq = local * FULL_BLOCKS  # and their full key blocks
        event = local * EVENTS
        pair = local % 2
        pair_phase = (local // 2) & 1
        mbarrier.wait(q_ready.index(pair), pair_phase)
        q = q_slots.index(pair).slice(HALF * ROWS, ROWS)

        # The first block: its scores alone, then its probabilities wait for the next block.
        slot = seq % STAGES
        mbarrier.wait(k_ready.index(slot), (seq // STAGES) & 1)
        k_first = k_slots.index(slot).permute((1, 0))
        s_zero = gl.zeros([ROWS, BN], gl.float32, s_layout)
        _await_turn(turns, event, HALF, TURNS)
        s_tok = warpgroup_mma(q, k_first, s_zero, use_acc=False, is_async=True)
        _pass_turn(turns, HALF, TURNS)
        event += 1
        scores, _, _ = warpgroup_mma_wait(0, deps=(s_tok, q, k_first))
        mbarrier.arrive(k_empty.index(slot))
        m_i = gl.full([ROWS], SCORE_FLOOR, gl.float32, row_layout)
        l_i = gl.zeros([ROWS], gl.float32, row_layout)
        p, alpha, m_i, l_i = _softmax_step(scores, m_i, l_i, qk_scale, row_layout)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        acc = gl.zeros([ROWS, D], gl.float32, o_layout)
        for _block in range(1, FULL_BLOCKS):
            seq += 1
            acc, p_op, alpha, m_i, l_i = _full_block(
                q, acc, p_op, alpha, m_i, l_i, seq, qk_scale, k_slots, v_slots, k_ready,
                k_empty, v_ready, v_empty, turns, event, STAGES, s_layout, HALF, TURNS,
            )  # fmt: skip
            event += 1

        # The last full block's P V: beside the tail's scores, or alone.
        last = seq % STAGES
        mbarrier.wait(v_ready.index(last), (seq // STAGES) & 1)
        v_last = v_slots.index(last)
        if HAS_TAIL:
            # Keys FULL_BLOCKS * BN onwards; those past the tile's end masked.
            mbarrier.wait(t_ready.index(pair), pair_phase)
            k_tail = kt_slots.index(pair).permute((1, 0))
            t_zero = gl.zeros([ROWS, TAIL], gl.float32, t_layout)
            tail_scores, o_tok = _scores_beside_pv(
                q, k_tail, t_zero, acc, alpha, p_op, v_last, turns, event, HALF, TURNS
            )
            event += 1
            keys = FULL_BLOCKS * BN + gl.arange(0, TAIL, layout=gl.SliceLayout(0, t_layout))
            tail_scores = gl.where(gl.expand_dims(keys < TOKENS, 0), tail_scores, SCORE_FLOOR)
            p, alpha, m_i, l_i = _softmax_step(tail_scores, m_i, l_i, qk_scale, row_layout)
            acc, _, _ = warpgroup_mma_wait(0, deps=(o_tok, v_last, p_op))
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            v_last = vt_slots.index(pair)
        acc = _rescaled(acc, alpha)
        _await_turn(turns, event, HALF, TURNS)
        o_tok = warpgroup_mma(p_op, v_last, acc, is_async=True)
        _pass_turn(turns, HALF, TURNS)
        out, _, _ = warpgroup_mma_wait(0, deps=(o_tok, v_last, p_op))
        mbarrier.arrive(v_empty.index(last))
        mbarrier.arrive(q_empty.index(pair))
        if HAS_TAIL:
            mbarrier.arrive(t_empty.index(pair))

        out = out / gl.expand_dims(gl.convert_layout(l_i, gl.SliceLayout(1, o_layout)), 1)
        rows = HALF * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, o_layout))
        columns = head * D + gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
        in_tile = (q_row - key_row) + rows < TOKENS
        offsets = gl.expand_dims((q_row + rows).to(gl.int64) * out_stride, 1)
        pointers = out_ptr + offsets + gl.expand_dims(columns, 0)
        gl.store(pointers, out.to(dtype), mask=gl.expand_dims(in_tile, 1))


@gluon.jit
def _barriers(size: gl.constexpr, count: gl.constexpr):
    bars = gl.allocate_shared_memory(gl.int64, [size, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(size):
        mbarrier.init(bars.index(i), count=count)
    return bars


@gluon.jit(do_not_specialize=["num_items"])
def hopper_vit_attention_kernel(
    q_desc, k_desc, v_desc, kt_desc, vt_desc, out_ptr, out_stride, qk_scale, num_items, heads,
    TOKENS: gl.constexpr, STAGES: gl.constexpr, TURNS: gl.constexpr,
):  # fmt: skip
    dtype: gl.constexpr = q_desc.dtype
    q_block: gl.constexpr = q_desc.block_type.shape
    kv_block: gl.constexpr = k_desc.block_type.shape
    tail_block: gl.constexpr = kt_desc.block_type.shape
    q_slots = gl.allocate_shared_memory(dtype, [2, q_block[0], q_block[1]], q_desc.layout)
    k_slots = gl.allocate_shared_memory(dtype, [STAGES, kv_block[0], kv_block[1]], k_desc.layout)
    v_slots = gl.allocate_shared_memory(dtype, [STAGES, kv_block[0], kv_block[1]], v_desc.layout)
    kt_slots = gl.allocate_shared_memory(dtype, [2, tail_block[0], tail_block[1]], kt_desc.layout)
    vt_slots = gl.allocate_shared_memory(dtype, [2, tail_block[0], tail_block[1]], vt_desc.layout)
    # Consumer-side barriers count both consumers' arrivals.
    bars = (
        _barriers(2, 1), _barriers(2, 2),  # q_ready, q_empty
        _barriers(STAGES, 1), _barriers(STAGES, 2),  # k_ready, k_empty
        _barriers(STAGES, 1), _barriers(STAGES, 2),  # v_ready, v_empty
        _barriers(2, 1), _barriers(2, 2),  # t_ready, t_empty
        _barriers(2, 1),  # turns
    )  # fmt: skip

    descs = (q_desc, k_desc, v_desc, kt_desc, vt_desc)
    smem = (q_slots, k_slots, v_slots, kt_slots, vt_slots)
    gl.warp_specialize(
        [
            (_loader, (descs, smem, bars, num_items, heads, TOKENS, STAGES)),
            (_consumer, (out_ptr, out_stride, qk_scale, smem, bars, num_items, heads,
                         0, TOKENS, STAGES, TURNS)),
            (_consumer, (out_ptr, out_stride, qk_scale, smem, bars, num_items, heads,
                         1, TOKENS, STAGES, TURNS)),
        ],
        [4, 4],
        [CONSUMER_REGISTERS, CONSUMER_REGISTERS],
    )  # fmt: skip


def _as_rows(t: torch.Tensor) -> torch.Tensor | None:
    """t [tiles, tokens, heads, head_dim] as a [tiles * tokens, heads * head_dim] view of the
    same memory (rows one token stride apart), or None when its strides do not allow one."""
    tiles, tokens, heads, head_dim = t.shape
    if t.stride(3) != 1 or t.stride(2) != head_dim or t.stride(0) != tokens * t.stride(1):
        return None
    return t.as_strided((tiles * tokens, heads * head_dim), (t.stride(1), 1))


def hopper_attention_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `hopper_vit_attention` takes these [tiles, tokens, heads, head_dim] inputs: a
    Hopper GPU, one 16-bit dtype and device, head_dim 64, at least one full block of tokens,
    and tiles laid out one after another with 16-byte aligned rows (TMA)."""
    if not (q.is_cuda and q.dim() == 4 and q.shape == k.shape == v.shape):
        return False
    if q.dtype not in HOPPER_ATTENTION_DTYPES or not (q.dtype == k.dtype == v.dtype):
        return False
    if not (q.device == k.device == v.device) or q.shape[3] != HEAD_DIM or q.shape[1] < BLOCK_N:
        return False
    for t in (q, k, v):
        if _as_rows(t) is None or t.data_ptr() % 16 != 0 or (t.stride(1) * t.element_size()) % 16:
            return False
    return _is_hopper(q.device.index)


@functools.cache
def _is_hopper(device_index: int | None) -> bool:
    return hopper_or_later(device_index) and torch.cuda.get_device_capability(device_index)[0] == 9


@functools.cache
def _shared_layout(block: tuple[int, int], dtype: torch.dtype) -> gl.NVMMASharedLayout:
    element = gl.bfloat16 if dtype == torch.bfloat16 else gl.float16
    return gl.NVMMASharedLayout.get_default_for(list(block), element)


@functools.cache
def _sm_count(device_index: int | None) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def hopper_vit_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    qk_scale: float,
    stages: int = KV_STAGES,
    turns: bool = WARPGROUP_TURNS,
) -> torch.Tensor:
    """softmax(q k^T * scale) v per (tile, head) -> new [tiles, tokens, heads * head_dim];
    `qk_scale` is the softmax scale times log2(e), positive. `stages` and `turns` (the
    consumers' ping-pong) are for benchmarks. Needs `hopper_attention_applies(q, k, v)` (raises
    otherwise)."""
    if not hopper_attention_applies(q, k, v):
        raise ValueError("hopper_vit_attention needs hopper_attention_applies(q, k, v)")
    tiles, tokens, heads, head_dim = q.shape
    out = torch.empty((tiles, tokens, heads * head_dim), dtype=q.dtype, device=q.device)
    if tiles == 0:
        return out
    tail = tail_keys(tokens) or 16  # with no tail its slots are allocated and never loaded

    def descriptor(t: torch.Tensor, rows: int) -> TensorDescriptor:
        block = (rows, head_dim)
        return TensorDescriptor.from_tensor(
            _as_rows(t), list(block), _shared_layout(block, t.dtype)
        )

    num_items = tiles * heads * -(-tokens // BLOCK_M)
    grid = (min(num_items, _sm_count(q.device.index)),)
    hopper_vit_attention_kernel[grid](
        descriptor(q, BLOCK_M), descriptor(k, BLOCK_N), descriptor(v, BLOCK_N),
        descriptor(k, tail), descriptor(v, tail),
        out, heads * head_dim, qk_scale, num_items, heads,
        TOKENS=tokens, STAGES=stages, TURNS=turns, num_warps=4, maxnreg=KERNEL_MAX_REGISTERS,
    )  # fmt: skip
    return out
