"""Image-embedding splice: copies embeds [E, hidden] over rows [E] of hidden [T, hidden], in place.

The torch reference is `hidden.index_copy(0, rows, embeds.to(hidden.dtype))` (out of place) in
`ocula.models.decoder_blocks.embed_with_splice`; this copy (with the same round-to-nearest
conversion when the dtypes differ) writes the same values into `hidden` itself. Rows must be
distinct and below T: not checked, which would need a host sync. A negative row skips its
embedding: a CUDA graph's static splice buffer pads its unused entries with -1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _splice_kernel(
    hidden_ptr,
    embeds_ptr,
    rows_ptr,
    width,
    hidden_row_stride,
    embeds_row_stride,
    BLOCK: tl.constexpr,
):
    index = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    row = tl.load(rows_ptr + index).to(tl.int64)
    mask = (cols < width) & (row >= 0)
    values = tl.load(embeds_ptr + index * embeds_row_stride + cols, mask=mask)
    tl.store(
        hidden_ptr + row * hidden_row_stride + cols,
        values.to(hidden_ptr.dtype.element_ty),
        mask=mask,
    )


def splice_rows_(hidden: torch.Tensor, rows: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
    """hidden[rows[i]] = embeds[i] for every i, in place; returns hidden.

    hidden: [T, width]; embeds: [E, width] (any float dtype, converted to hidden's); rows: [E]
    integers, negative ones skipped. Both 2-D tensors need a last stride of 1.
    """
    if hidden.dim() != 2 or embeds.dim() != 2 or embeds.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"embeds {tuple(embeds.shape)} cannot be spliced into hidden {tuple(hidden.shape)}"
        )
    if rows.shape != (embeds.shape[0],) or rows.dtype.is_floating_point:
        raise ValueError(f"rows must be [{embeds.shape[0]}] integers, got {tuple(rows.shape)}")
    if hidden.stride(-1) != 1 or embeds.stride(-1) != 1:
        raise ValueError("hidden and embeds need a last stride of 1")
    if not (hidden.device == embeds.device == rows.device):
        raise ValueError("hidden, embeds and rows must be on one device")
    num_embeds, width = embeds.shape
    if num_embeds == 0 or width == 0:
        return hidden
    block = min(triton.next_power_of_2(width), 1024)
    _splice_kernel[(num_embeds, triton.cdiv(width, block))](
        hidden,
        embeds,
        rows,
        width,
        hidden.stride(0),
        embeds.stride(0),
        BLOCK=block,
        num_warps=4,
    )
    return hidden
