"""An elementwise activation of a 16-bit tensor as a lookup in a table of its 65,536 values.

A bf16 or fp16 tensor holds one of 2**16 bit patterns per element, and an elementwise torch
activation maps each pattern to one output of the same dtype. `activation_table` computes that
map once per (function, dtype, device) by calling the function itself on every pattern; the
kernel then reads each element's bits and gathers its output from the table (128 KiB, which stays
in L1/L2). The result is bit-identical to the function on that device by construction, NaNs and
infinities included, provided the function computes each element alone (the same input gives the
same output wherever it sits), which holds for torch's CUDA activations.

It pays where the function's arithmetic, not memory, sets its time, and only on large tensors:
exact GELU's erf takes ~30 float32 instructions per element. On an H200, for the ViT's fc1
output (4.2 M elements per tile), torch's GELU took 180.6 us at 32 tiles and the table 165 us, 95
against 85 us at 16 tiles, about the same at 8, and at 1-2 tiles the table was slower (21-26
against 28-46 us: each SM first pulls the table through its caches). `worth_a_table` draws that
line.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import triton
import triton.language as tl

TABLE_DTYPES = (torch.float16, torch.bfloat16)
BLOCK = 8192
# Below this many elements torch's own kernel was as fast or faster (module docstring).
MIN_TABLE_ELEMENTS = 1 << 25


def worth_a_table(x: torch.Tensor) -> bool:
    """Whether `table_activation_` should take x: 16-bit, contiguous and large enough."""
    return x.dtype in TABLE_DTYPES and x.is_contiguous() and x.numel() >= MIN_TABLE_ELEMENTS


def activation_table(
    function: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """int16 [65536]: entry i holds the bits of function(x) for the x whose bits are i.

    Cached per (function, dtype, device). Build it outside CUDA-graph capture (an eager forward
    first): tensors created inside a capture are filled only when the graph replays."""
    if dtype not in TABLE_DTYPES:
        raise ValueError(f"a lookup table needs a 16-bit float dtype {TABLE_DTYPES}, got {dtype}")
    return _cached_table(function, dtype, torch.device(device))


@functools.cache
def _cached_table(
    function: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "the activation table must be built before CUDA-graph capture (run one eager forward)"
        )
    unsigned = torch.arange(1 << 16, dtype=torch.int32, device=device)
    signed = torch.where(unsigned >= 1 << 15, unsigned - (1 << 16), unsigned).to(torch.int16)
    outputs = function(signed.view(dtype))
    if outputs.dtype != dtype or outputs.shape != signed.shape:
        raise ValueError("the function must be elementwise and keep the dtype")
    return outputs.contiguous().view(torch.int16)


@triton.jit
def _table_lookup_kernel(x_ptr, table_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    bits = tl.load(x_ptr + offsets, mask=mask, other=0)
    index = bits.to(tl.int32) & 0xFFFF  # the pattern read as unsigned
    tl.store(out_ptr + offsets, tl.load(table_ptr + index, mask=mask), mask=mask)


def warm_up(function: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype, device) -> None:
    """Builds the table and compiles the kernel now (start-up), not in the first large batch:
    a tensor of one block takes the same compiled variant as a large one (sizes divisible by 16)."""
    table_activation_(torch.zeros(BLOCK, dtype=dtype, device=device), function)


def table_activation_(
    x: torch.Tensor, function: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Replaces x by function(x), element by element, through the lookup table; returns x.

    x: fp16 or bf16, contiguous (a non-contiguous x raises), on the device the kernel runs on.
    Bit-identical to `function(x)` on that device (see the module docstring)."""
    if not x.is_contiguous():
        raise ValueError("table_activation_ works in place on a contiguous tensor")
    table = activation_table(function, x.dtype, x.device)
    bits = x.view(torch.int16)
    numel = bits.numel()
    if numel:
        _table_lookup_kernel[(triton.cdiv(numel, BLOCK),)](
            bits, table, bits, numel, BLOCK=BLOCK, num_warps=8
        )
    return x
