"""The partitions of the Hopper ViT attention kernel (`ocula.kernels.vit_attention_hopper`, which
holds the kernel, its contract and its layout): the TMA loader, and the consumers with their
online softmax, each block's Q K^T beside the block before's P V, and the consumers' turns.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

SCORE_FLOOR = gl.constexpr(float("-inf"))


@gluon.jit
def _item(item, heads, TOKENS: gl.constexpr, BM: gl.constexpr):
    """Where work item `item` (BM queries of one tile and head) lies: (first query row, first
    key row, head, items this program ran before it, its Q / tail slot, that slot's phase).
    Items run query block fastest, then head, then tile, so the programs at work share a few
    tiles' keys in L2."""
    q_blocks: gl.constexpr = (TOKENS + BM - 1) // BM
    q_block = item % q_blocks
    head = (item // q_blocks) % heads
    key_row = (item // (q_blocks * heads)) * TOKENS
    local = (item - gl.program_id(0)) // gl.num_programs(0)
    return key_row + q_block * BM, key_row, head, local, local % 2, (local // 2) & 1


@gluon.jit
def loader_partition(
    descs, smem, bars, num_items, heads, TOKENS: gl.constexpr, STAGES: gl.constexpr
):
    q_desc, k_desc, v_desc, kt_desc, vt_desc = descs
    q_slots, k_slots, v_slots, kt_slots, vt_slots = smem
    q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, t_ready, t_empty, _ = bars
    BN: gl.constexpr = k_desc.block_type.shape[0]
    D: gl.constexpr = k_desc.block_type.shape[1]
    FULL_BLOCKS: gl.constexpr = TOKENS // BN
    BM: gl.constexpr = q_desc.block_type.shape[0]
    for item in range(gl.program_id(0), num_items, gl.num_programs(0)):
        q_row, key_row, head, local, pair, pair_phase = _item(item, heads, TOKENS, BM)
        seq = local * FULL_BLOCKS  # this program's full key blocks before the item
        column = head * D
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
def _rounded(p, dtype: gl.constexpr):
    """p rounded to 16 bits two at a time (one `cvt.rn.{bf16,f16}x2.f32` a pair): `p.to(dtype)`
    becomes one conversion an element here, which shares the exponentials' 16-a-clock unit."""
    if dtype == gl.bfloat16:
        rounded = gl.inline_asm_elementwise(
            "cvt.rn.bf16x2.f32 $0, $2, $1;", "=r,r,r", [p], gl.bfloat16, True, 2
        )
    else:
        rounded = gl.inline_asm_elementwise(
            "cvt.rn.f16x2.f32 $0, $2, $1;", "=r,r,r", [p], gl.float16, True, 2
        )
    return rounded


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
    p_op = gl.convert_layout(_rounded(p, q.dtype), p_layout)
    return acc, p_op, alpha, m_i, l_i


@gluon.jit
def consumer_partition(
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
        q_row, key_row, head, local, pair, pair_phase = _item(item, heads, TOKENS, BM)
        seq = local * FULL_BLOCKS  # this program's full key blocks before the item
        event = local * EVENTS
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
        p_op = gl.convert_layout(_rounded(p, dtype), p_layout)
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
            p_op = gl.convert_layout(_rounded(p, dtype), p_layout)
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
        gl.store(pointers, _rounded(out, dtype), mask=gl.expand_dims(in_tile, 1))
