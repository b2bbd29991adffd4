"""act(x W^T + b) for large x: one persistent GEMM whose activation runs inside its main loop.

The ViT's fc1 (32,800 x 1024 -> 4096 at 32 tiles) is followed by exact GELU, which
`ocula.kernels.table_activation` applies as a 65,536-entry lookup in a second kernel: on an H100
that pass reads and writes the 268 MB output again (181 us of a ~2 ms layer). A GEMM with the
activation in its epilogue did not help (BENCHMARKS.md, sixteenth session): the epilogue's
instructions were not hidden under other tiles' tensor-core work, because Triton's Hopper
schedule runs a tile's epilogue after its main loop in the same warps.

Here each program owns a sequence of output tiles (persistent: one program per SM, the tile
loop flattened into the K loop so the next tile's loads start under this one's last MMAs) and
defers a tile's activation to its next tile's main loop. The epilogue adds the bias, rounds to
the output dtype and stores the pre-activation bits; while the next tile's K loop runs, every K
step also moves CHUNK rows of the previous tile one stage through a three-stage pipeline (load
the bits, gather their table entries, store them in place), so that each load's latency passes
under a step's MMAs instead of stalling them; the rows were just written and are still in L2. The
program's last tile is activated after its loop. A barrier after each epilogue makes the tile's
stores visible to all the program's threads before the next loop reads them.

Status (BENCHMARKS.md, twenty-eighth session): off in the engine (`intern_vit.USE_FUSED_FC1`).
A first version, with the tile loop not flattened and each chunk loaded, gathered and stored
within its step, was bit-identical to cuBLAS + the table on an H100 but slower: 0.777 ms at 32
tiles against 0.567 (the GEMM alone 0.474 against cuBLAS's 0.403; the activation's dependent
loads stalled the MMAs) and the encoder 53.7 against 49.7 ms. This version (flattened, pipelined)
passes the interpreter tests but has not been run on a GPU yet:
`python -m benchmarks.profile_fused_fc1` there, or `--switches fused_fc1=on` in the benchmarks.

Results are bit-identical to `table_activation_(F.linear(x, W, b), act)` wherever the product
x W^T + b rounds to the same bits as torch's (the table makes act exact; the K sum is float32 in
an order the tensor cores pick, so only exactly representable sums are order-independent).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ocula.kernels import hopper_or_later
from ocula.kernels.table_activation import TABLE_DTYPES, activation_table

# (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps): the tile the sixteenth session's sweep found best for
# a persistent TMA GEMM on the ViT's shapes (H100).
DEFAULT_CONFIG = (128, 256, 64, 3, 8)
# Below this many output elements the separate table kernel is not used either
# (`table_activation.MIN_TABLE_ELEMENTS`); the fused kernel takes the same inputs.
MIN_OUTPUT_ELEMENTS = 1 << 25


@triton.jit
def _chunk(
    out_ptr, row0, col0, first_row, valid, M, N,
    ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Pointers and mask of rows first_row .. first_row + ROWS of the tile at (row0, col0)."""
    in_tile = first_row + tl.arange(0, ROWS)
    rows = row0 + in_tile
    cols = col0 + tl.arange(0, BLOCK_N)
    row_ok = (valid != 0) & (in_tile < BLOCK_M) & (rows < M)
    mask = row_ok[:, None] & (cols < N)[None, :]
    return out_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], mask


@triton.jit
def _deferred_step(
    out_ptr, table_ptr, M, N, loaded, loaded_at, gathered, gathered_at, load_at,
    ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One step of the activation's three-stage pipeline over chunks (a chunk is named by
    (row0, col0, first_row, valid)): store the chunk gathered a step ago, gather the table
    entries of the chunk loaded a step ago, load the chunk `load_at`. Each value is first used
    a step after its load was issued, so the loads' latency passes under the MMAs between."""
    pointers, mask = _chunk(out_ptr, *gathered_at, M, N, ROWS, BLOCK_M, BLOCK_N)
    tl.store(pointers, gathered, mask=mask)
    pointers, mask = _chunk(out_ptr, *loaded_at, M, N, ROWS, BLOCK_M, BLOCK_N)
    gathered = tl.load(table_ptr + (loaded.to(tl.int32) & 0xFFFF), mask=mask, other=0)
    pointers, mask = _chunk(out_ptr, *load_at, M, N, ROWS, BLOCK_M, BLOCK_N)
    loaded = tl.load(pointers, mask=mask, other=0)
    return loaded, gathered


@triton.jit
def _linear_table_kernel(
    x_desc, w_desc, bias_ptr, out_ptr, table_ptr, M, N,
    K_STEPS: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    CHUNK: tl.constexpr, STAGES: tl.constexpr, PROGRAMS: tl.constexpr, ACTIVATE: tl.constexpr,
):  # fmt: skip
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles = tl.cdiv(M, BLOCK_M) * tiles_n
    # The previous tile's corner and whether there is one, and the activation pipeline's two
    # chunks in flight (from `zero`: loop-carried values must be tensors, not constants).
    zero = tl.program_id(0) * 0
    previous_row0 = zero
    previous_col0 = zero
    has_previous = zero
    loaded = tl.zeros((CHUNK, BLOCK_N), dtype=tl.int16)
    gathered = tl.zeros((CHUNK, BLOCK_N), dtype=tl.int16)
    loaded_at = (zero, zero, zero, zero)
    gathered_at = (zero, zero, zero, zero)
    # Flattened: the next tile's first loads are issued during this tile's last steps.
    for tile in tl.range(tl.program_id(0), tiles, PROGRAMS, flatten=True):
        row0 = (tile // tiles_n) * BLOCK_M
        col0 = (tile % tiles_n) * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for step in tl.range(K_STEPS, num_stages=STAGES):
            x = x_desc.load([row0, step * BLOCK_K])
            w = w_desc.load([col0, step * BLOCK_K])
            acc = tl.dot(x, w.T, acc)
            if ACTIVATE:
                load_at = (previous_row0, previous_col0, step * CHUNK, has_previous)
                loaded, gathered = _deferred_step(
                    out_ptr, table_ptr, M, N, loaded, loaded_at, gathered, gathered_at,
                    load_at, CHUNK, BLOCK_M, BLOCK_N,
                )  # fmt: skip
                gathered_at = loaded_at
                loaded_at = load_at
        cols = col0 + tl.arange(0, BLOCK_N)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        rows = row0 + tl.arange(0, BLOCK_M)
        pointers = out_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
        mask = (rows < M)[:, None] & (cols < N)[None, :]
        tl.store(pointers, acc.to(OUT_DTYPE).to(tl.int16, bitcast=True), mask=mask)
        # Every thread's stores of this tile land before any thread reads them back above.
        tl.debug_barrier()
        previous_row0 = row0
        previous_col0 = col0
        has_previous = 1
    if ACTIVATE:
        # The last tile's chunks, then the two still in flight.
        for step in range(K_STEPS + 2):
            load_at = (previous_row0, previous_col0, step * CHUNK, has_previous * (step < K_STEPS))
            loaded, gathered = _deferred_step(
                out_ptr, table_ptr, M, N, loaded, loaded_at, gathered, gathered_at,
                load_at, CHUNK, BLOCK_M, BLOCK_N,
            )  # fmt: skip
            gathered_at = loaded_at
            loaded_at = load_at


def fused_applies(x: torch.Tensor, weight: torch.Tensor, features: int) -> bool:
    """Whether `linear_table_activation` takes these inputs: 16-bit and contiguous, on a GPU with
    TMA (Hopper on) or in the interpreter, rows a multiple of 16 bytes, a large output."""
    if x.dtype not in TABLE_DTYPES or x.dtype != weight.dtype or x.dim() != 2:
        return False
    if x.is_cuda and not hopper_or_later(x.device.index):
        return False
    if not (x.is_contiguous() and weight.is_contiguous()):
        return False
    aligned = all(t.data_ptr() % 16 == 0 for t in (x, weight)) and x.shape[1] * 2 % 16 == 0
    return aligned and x.shape[0] * features >= MIN_OUTPUT_ELEMENTS


def linear_table_activation(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    function: Callable[[torch.Tensor], torch.Tensor],
    config: tuple[int, int, int, int, int] = DEFAULT_CONFIG,
    programs: int | None = None,
    activate: bool = True,
) -> torch.Tensor:
    """function(F.linear(x, weight, bias)) for x [M, K], weight [N, K], bias [N] (16-bit, one
    dtype, contiguous; `function` elementwise, see `table_activation`). `programs` overrides the
    persistent grid (one per SM on a GPU; tests use few to give each program several tiles).
    `activate=False` leaves the pre-activation (benchmarks: the GEMM's own time).

    Callers check `fused_applies` first except in tests (any size works)."""
    if x.dtype not in TABLE_DTYPES or weight.dtype != x.dtype:
        raise ValueError(f"x and weight must share a 16-bit dtype {TABLE_DTYPES}")
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x [M, K] and weight [N, K] expected, got {x.shape} and {weight.shape}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be [{weight.shape[0]}] of {x.dtype}")
    if not (x.is_contiguous() and weight.is_contiguous()) or x.shape[1] * 2 % 16:
        raise ValueError("x and weight must be contiguous with rows of a multiple of 16 bytes")
    block_m, block_n, block_k, stages, warps = config
    rows, depth = x.shape
    features = weight.shape[0]
    table = activation_table(function, x.dtype, x.device)
    out = torch.empty((rows, features), dtype=x.dtype, device=x.device)
    if rows == 0 or features == 0:
        return out
    k_steps = triton.cdiv(depth, block_k)
    tiles = triton.cdiv(rows, block_m) * triton.cdiv(features, block_n)
    if programs is None:
        programs = _processors(x.device) if x.is_cuda else 4
    programs = max(1, min(programs, tiles))
    x_desc = TensorDescriptor(x, list(x.shape), list(x.stride()), [block_m, block_k])
    w_desc = TensorDescriptor(weight, list(weight.shape), list(weight.stride()), [block_n, block_k])
    _linear_table_kernel[(programs,)](
        x_desc,
        w_desc,
        bias if bias is not None else weight,
        out.view(torch.int16),
        table,
        rows,
        features,
        K_STEPS=k_steps,
        HAS_BIAS=bias is not None,
        OUT_DTYPE=tl.bfloat16 if x.dtype == torch.bfloat16 else tl.float16,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        CHUNK=triton.next_power_of_2(triton.cdiv(block_m, k_steps)),
        STAGES=stages,
        PROGRAMS=programs,
        ACTIVATE=activate,
        num_warps=warps,
    )
    return out


def _processors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count
