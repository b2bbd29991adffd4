"""The ViT's bidirectional attention on Hopper: a persistent, warp-specialized Gluon kernel whose
softmax runs while the tensor cores compute the next key block's scores.

Same contract as `ocula.kernels.vit_attention.vit_attention` (q, k, v [tiles, tokens, heads,
head_dim] views of the qkv projection, output [tiles, tokens, heads * head_dim]), for head_dim
64, 16-bit inputs, at least 128 tokens a tile, and q, k, v whose tiles follow each other in one
row-major buffer (`hopper_attention_applies`).

Why: with 64-wide heads a score costs as much on the special-function unit (its exponential) as
on the tensor cores, so a kernel that runs them one after the other leaves either unit idle half
the time. Here each warpgroup issues a block's Q K^T and the block before's P V together as
asynchronous wgmmas and computes the block's softmax while P V runs (FlashAttention-3's
intra-warpgroup overlap), and the two warpgroups of a program interleave on the SM. Nothing is
in flight across the key loop's back-edge: a first version that kept P V in flight there had
every wgmma serialized by ptxas (its warning C7514), which tests/kernels/test_sm90_compiles.py
now checks for.

Measured on an H100 (BENCHMARKS.md, thirty-first session): correct, but slower than the Triton
kernel, 0.396-0.404 ms against 0.374 at 32 tiles alone and 10.0 against 9.0 ms of a 32-tile
forward, so the model takes it only when its switch is on (`ocula.models.intern_vit_attention`).
Taking turns did not help (0.404 with, 0.396 without). That version rounded P one element at a
time (Gluon lowers `.to()` so; the Triton kernel's PTX pairs them), 64 conversions a thread and
block beside its 64 exponentials, likely on the same 16-a-clock unit; P is now rounded in pairs
(`_rounded`), compiled and checked on the CPU machine, not yet timed on a GPU.

Layout of one program (one per SM, `maxnreg` split by `gl.warp_specialize`):
- a loader partition (4 warps, 40 registers; one thread issues the TMA copies) walks the
  program's work items (128 query rows of one (tile, head)): their Q block into one of two
  slots, then every key block's K and V into a ring of `KV_STAGES` slots (`ready` barriers carry
  the bytes, `empty` barriers, counting both consumers, return the slots), then the tail block
  (the `tokens % 128` last keys in a block of a power of two, at least 16) into one of two tail
  slots;
- two consumer partitions (4 warps each, 232 registers) own query rows 0-63 and 64-127 of each
  item. Both read every K and V slot; each keeps its 64 x 128 score block, the block before's
  probabilities (16-bit, the register operand of P V) and its 64 x 64 output accumulator in
  registers. With `turns`, they issue their wgmmas in turns. The partitions are in
  `ocula.kernels.vit_attention_hopper_partitions`.

Numbers: as the Triton kernel: scores and sums in float32, the softmax in base 2 with
scale * log2(e) folded into one FMA per score, P rounded to the inputs' dtype before P V, and
the output divided by the row sum at the end. Keys of a tile's last block past its end (which
the 2-D TMA loads read from the next tile, or as zeros past the buffer) are masked to -inf;
their V rows meet probabilities of exactly zero. Query rows past a tile's end are computed and
never stored.
"""

from __future__ import annotations

import math

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ocula.kernels.gluon_hopper import is_hopper, nvmma_layout, sm_count
from ocula.kernels.vit_attention_hopper_partitions import consumer_partition, loader_partition

HOPPER_ATTENTION_DTYPES = (torch.bfloat16, torch.float16)
HEAD_DIM = 64
BLOCK_M = 128  # query rows of a work item: two consumer warpgroups of 64
BLOCK_N = 128  # keys of a full block
WARPGROUP_TURNS = False  # consumers in turns (`_await_turn`): 0.404 against 0.396 ms without
KV_STAGES = 3  # 3 x 32 KB of K and V slots + 2 x 16 KB of Q slots + 2 x 4 KB of tail slots
CONSUMER_REGISTERS = gl.constexpr(232)
KERNEL_MAX_REGISTERS = 168  # 232 + 232 + 40 = 3 x 168 a thread (the loader keeps 40)


def tail_keys(tokens: int) -> int:
    """Rows of the tail block, for the keys past the last full block: a power of two (a TMA
    block's) of at least 16 (a wgmma step's); 0 when there are none."""
    tail = tokens % BLOCK_N
    return 0 if tail == 0 else max(16, 1 << (tail - 1).bit_length())


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
            (loader_partition, (descs, smem, bars, num_items, heads, TOKENS, STAGES)),
            (consumer_partition, (out_ptr, out_stride, qk_scale, smem, bars, num_items, heads,
                                  0, TOKENS, STAGES, TURNS)),
            (consumer_partition, (out_ptr, out_stride, qk_scale, smem, bars, num_items, heads,
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
    return is_hopper(q.device.index)


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
    if not 0 < qk_scale < math.inf:  # the scaled max is the max scaled only for a positive scale
        raise ValueError(f"the softmax scale must be positive and finite, got {qk_scale}")
    if not hopper_attention_applies(q, k, v):
        raise ValueError("hopper_vit_attention needs hopper_attention_applies(q, k, v)")
    tiles, tokens, heads, head_dim = q.shape
    out = torch.empty((tiles, tokens, heads * head_dim), dtype=q.dtype, device=q.device)
    if tiles == 0:
        return out
    tail = tail_keys(tokens) or 16  # with no tail its slots are allocated and never loaded

    def descriptor(t: torch.Tensor, rows: int) -> TensorDescriptor:
        block = (rows, head_dim)
        return TensorDescriptor.from_tensor(_as_rows(t), list(block), nvmma_layout(block, t.dtype))

    num_items = tiles * heads * -(-tokens // BLOCK_M)
    grid = (min(num_items, sm_count(q.device.index)),)
    hopper_vit_attention_kernel[grid](
        descriptor(q, BLOCK_M), descriptor(k, BLOCK_N), descriptor(v, BLOCK_N),
        descriptor(k, tail), descriptor(v, tail),
        out, heads * head_dim, qk_scale, num_items, heads,
        TOKENS=tokens, STAGES=stages, TURNS=turns, num_warps=4, maxnreg=KERNEL_MAX_REGISTERS,
    )  # fmt: skip
    return out
