"""y = act(x W^T + b) for many rows on Hopper: a persistent, warp-specialized "ping-pong" GEMM
written in Gluon, whose epilogue (bias, rounding, an activation looked up in a table, the store)
runs while the tensor cores work on the next tile.

Why: fc1 of the ViT is followed by exact GELU, which otherwise runs as a separate pass over
fc1's output through a table of all 65,536 bf16 patterns (`ocula.kernels.table_activation`:
~0.2 ms a layer at 32 tiles on an H100); here each output is looked up as it leaves the
accumulator. On an H100, fc1 and GELU over 32 tiles took 0.457 ms against 0.599 for cuBLAS and
the table pass; the 24-layer encoder 47.2 against 48.7 ms. Without an activation the kernel
trails cuBLAS by 1-17% on the ViT's shapes, so only fc1 uses it (`ocula.models.intern_vit_linear`).
An erf in the epilogue is not an option: libdevice's erff differs from torch's CUDA GELU on 11
of the 65,536 bf16 inputs (x < -3, where 1 + erf cancels), and it was not hidden (BENCHMARKS.md).

Layout of one program (one per SM, `maxnreg` split by `gl.warp_specialize`):
- a loader partition (4 warps, 40 registers; one thread issues the TMA copies) walks this
  program's tiles in order and streams x[BLOCK_M, BLOCK_K] and W[BLOCK_N, BLOCK_K] tiles
  into a ring of STAGES shared-memory slots (`ready` barriers carry the bytes, `empty`
  barriers return the slots);
- two MMA partitions (4 warps each, 232 registers; one 128 x 128 float32 accumulator each)
  take the program's tiles in turns (local tiles 0, 2, 4... and 1, 3, 5...). The `order`
  barriers let a partition start its tile's MMAs only once the other has issued all of the
  previous tile's: the tensor cores serve one tile at a time while the other partition runs
  its epilogue. The turns also keep each `ready` wait at most one phase ahead of the
  barrier (a partition skips the other's phases, which mbarrier parity cannot tell apart
  otherwise).

Numbers: products summed in float32 in K order, the bias added in float32, one rounding to x's
dtype, then the table's entry for that pattern: on an H100 the same bits as `F.linear` (cuBLAS)
followed by the table pass, at every ViT shape measured (tests/kernels check a float64 bound and
the table bit for bit). Tiles are TMA-loaded with zero fill, so M, N and K need not divide the
blocks (K and N must keep rows 16-byte aligned: multiples of 8).
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ocula.kernels.gluon_hopper import is_hopper, nvmma_layout, sm_count

PINGPONG_DTYPES = (torch.bfloat16, torch.float16)
BLOCK_M = 128
BLOCK_N = 128
BLOCK_K = 64
STAGES = 5  # 5 x 32 KB of operand slots + 2 x 32 KB of output tiles: 224 KB of the 227 KB
MMA_REGISTERS = gl.constexpr(232)
# 3 warpgroups share the SM's 64 K registers: 168 x 3 = 504 = 232 + 232 + 40 a thread, the
# loader (the default partition) keeping the 40 the MMA partitions leave.
KERNEL_MAX_REGISTERS = 168


@gluon.jit
def _tile_origin(tile, num_pid_n, BM: gl.constexpr, BN: gl.constexpr):
    # Row-major over output tiles: the programs running at once cover a few row blocks of x
    # (read from memory once) against all of W (which stays in L2).
    return (tile // num_pid_n) * BM, (tile % num_pid_n) * BN


@gluon.jit
def _loader(x_desc, w_desc, slots, barriers, sizes, STAGES_: gl.constexpr):
    x_slots, w_slots = slots
    ready, empty, _ = barriers
    num_tiles, num_pid_n, k_steps, _ = sizes
    BM: gl.constexpr = x_desc.block_type.shape[0]
    BK: gl.constexpr = x_desc.block_type.shape[1]
    BN: gl.constexpr = w_desc.block_type.shape[0]
    tile_bytes: gl.constexpr = x_desc.block_type.nbytes + w_desc.block_type.nbytes
    seq = 0
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        off_m, off_n = _tile_origin(tile, num_pid_n, BM, BN)
        for kk in range(k_steps):
            slot = seq % STAGES_
            # Slots start free: the first round waits on the phase before the first.
            mbarrier.wait(empty.index(slot), ((seq // STAGES_) & 1) ^ 1)
            bar = ready.index(slot)
            mbarrier.expect(bar, tile_bytes)
            tma.async_copy_global_to_shared(x_desc, [off_m, kk * BK], bar, x_slots.index(slot))
            tma.async_copy_global_to_shared(w_desc, [off_n, kk * BK], bar, w_slots.index(slot))
            seq += 1


@gluon.jit
def _mma_partition(
    out_desc, bias_ptr, table_ptr, slots, out_tiles, barriers, sizes,
    TURN: gl.constexpr, STAGES_: gl.constexpr, HAS_BIAS: gl.constexpr, HAS_TABLE: gl.constexpr,
):  # fmt: skip
    x_slots, w_slots = slots
    ready, empty, order = barriers
    num_tiles, num_pid_n, k_steps, N = sizes
    BM: gl.constexpr = out_desc.block_type.shape[0]
    BN: gl.constexpr = out_desc.block_type.shape[1]
    dtype: gl.constexpr = out_desc.dtype
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16]
    )
    out_tile = out_tiles.index(TURN)
    step = gl.num_programs(0)
    local = TURN  # this program's tile count before `tile`
    for tile in range(gl.program_id(0) + TURN * step, num_tiles, 2 * step):
        off_m, off_n = _tile_origin(tile, num_pid_n, BM, BN)
        # Wait until the other partition has issued every MMA of local tile `local - 1`.
        other_turn = (local - 1) // 2
        mbarrier.wait(order.index(1 - TURN), other_turn & 1, pred=local > 0)
        seq = local * k_steps
        acc = gl.zeros([BM, BN], gl.float32, acc_layout)
        for kk in range(k_steps):
            slot = seq % STAGES_
            mbarrier.wait(ready.index(slot), (seq // STAGES_) & 1)
            x_slot = x_slots.index(slot)
            w_slot = w_slots.index(slot).permute((1, 0))
            acc = warpgroup_mma(x_slot, w_slot, acc, use_acc=kk > 0, is_async=True)
            # One MMA in flight: the previous step's has finished reading its slot.
            acc, _, _ = warpgroup_mma_wait(1, deps=(acc, x_slot, w_slot))
            mbarrier.arrive(empty.index((seq + STAGES_ - 1) % STAGES_), pred=kk > 0)
            seq += 1
        mbarrier.arrive(order.index(TURN))
        acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.arrive(empty.index((seq + STAGES_ - 1) % STAGES_))

        if HAS_BIAS:
            columns = off_n + gl.arange(0, BN, layout=gl.SliceLayout(0, acc_layout))
            bias = gl.load(bias_ptr + columns, mask=columns < N, other=0.0)
            acc = acc + gl.expand_dims(bias.to(gl.float32), 0)
        out = acc.to(dtype)
        if HAS_TABLE:  # the activation: each 16-bit pattern's entry in the table
            index = out.to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
            out = gl.load(table_ptr + index).to(dtype, bitcast=True)
        tma.store_wait(0)  # this partition's previous tile has left out_tile
        out_tile.store(out)
        fence_async_shared()
        tma.async_copy_shared_to_global(out_desc, [off_m, off_n], out_tile)
        local += 2
    tma.store_wait(0)


# num_tiles follows the rows: not specialized, so that one compiled kernel serves every batch.
@gluon.jit(do_not_specialize=["num_tiles"])
def pingpong_linear_kernel(
    x_desc, w_desc, out_desc, bias_ptr, table_ptr, N, num_tiles, num_pid_n, k_steps,
    STAGES_: gl.constexpr, HAS_BIAS: gl.constexpr, HAS_TABLE: gl.constexpr,
):  # fmt: skip
    dtype: gl.constexpr = x_desc.dtype
    x_block: gl.constexpr = x_desc.block_type.shape
    w_block: gl.constexpr = w_desc.block_type.shape
    out_block: gl.constexpr = out_desc.block_type.shape
    x_slots = gl.allocate_shared_memory(dtype, [STAGES_, x_block[0], x_block[1]], x_desc.layout)
    w_slots = gl.allocate_shared_memory(dtype, [STAGES_, w_block[0], w_block[1]], w_desc.layout)
    out_tiles = gl.allocate_shared_memory(dtype, [2, out_block[0], out_block[1]], out_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES_, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES_, 1], mbarrier.MBarrierLayout())
    order = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES_):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    for i in gl.static_range(2):
        mbarrier.init(order.index(i), count=1)

    slots = (x_slots, w_slots)
    barriers = (ready, empty, order)
    sizes = (num_tiles, num_pid_n, k_steps, N)
    # The two MMA partitions differ only in TURN (Gluon takes no tuple concatenation here).
    gl.warp_specialize(
        [
            (_loader, (x_desc, w_desc, slots, barriers, sizes, STAGES_)),
            (_mma_partition, (out_desc, bias_ptr, table_ptr, slots, out_tiles, barriers, sizes,
                              0, STAGES_, HAS_BIAS, HAS_TABLE)),
            (_mma_partition, (out_desc, bias_ptr, table_ptr, slots, out_tiles, barriers, sizes,
                              1, STAGES_, HAS_BIAS, HAS_TABLE)),
        ],
        [4, 4],
        [MMA_REGISTERS, MMA_REGISTERS],
    )  # fmt: skip


def pingpong_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether `pingpong_linear` takes (x [M, K], weight [N, K], bias): a Hopper GPU, 16-bit,
    contiguous, one dtype and device, 16-byte aligned starts, K and N positive multiples of 8 (16-byte rows
    for the tensor descriptors)."""
    if not (x.is_cuda and x.dim() == 2 and weight.dim() == 2) or x.dtype not in PINGPONG_DTYPES:
        return False
    if weight.dtype != x.dtype or not (x.is_contiguous() and weight.is_contiguous()):
        return False
    if weight.device != x.device or (bias is not None and bias.device != x.device):
        return False
    if bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous()):
        return False
    n, k = weight.shape
    aligned = x.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0
    shapes_fit = x.shape[1] == k and k > 0 and n > 0 and k % 8 == 0 and n % 8 == 0
    return aligned and shapes_fit and is_hopper(x.device.index)


def pingpong_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation_table: torch.Tensor | None = None,
) -> torch.Tensor:
    """act(x @ weight^T + bias) [M, N]: act maps each rounded output's 16-bit pattern through
    `activation_table` (int16 [65536], `ocula.kernels.table_activation.activation_table`), or is
    the identity without one.

    Needs `pingpong_applies(x, weight, bias)` (raises otherwise)."""
    if not pingpong_applies(x, weight, bias):
        raise ValueError("pingpong_linear needs pingpong_applies(x, weight, bias)")
    if activation_table is not None and (
        activation_table.dtype != torch.int16 or activation_table.numel() != 1 << 16
    ):
        raise ValueError("an activation table holds the int16 bits of all 65,536 patterns")
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out

    def descriptor(t: torch.Tensor, block: tuple[int, int]) -> TensorDescriptor:
        return TensorDescriptor.from_tensor(t, list(block), nvmma_layout(block, t.dtype))

    num_pid_n = -(-n // BLOCK_N)
    num_tiles = -(-m // BLOCK_M) * num_pid_n
    k_steps = -(-k // BLOCK_K)
    grid = (min(num_tiles, sm_count(x.device.index)),)
    pingpong_linear_kernel[grid](
        descriptor(x, (BLOCK_M, BLOCK_K)),
        descriptor(weight, (BLOCK_N, BLOCK_K)),
        descriptor(out, (BLOCK_M, BLOCK_N)),
        bias if bias is not None else out,
        activation_table if activation_table is not None else out,
        n, num_tiles, num_pid_n, k_steps,
        STAGES_=STAGES, HAS_BIAS=bias is not None, HAS_TABLE=activation_table is not None,
        num_warps=4, maxnreg=KERNEL_MAX_REGISTERS,
    )  # fmt: skip
    return out
