"""Rotary position embedding (neox halves) applied in place to q and k in one launch.

The torch reference is `ocula.layers.rotary.apply_rotary` on cos/sin from
`RotaryEmbedding.lookup`. This kernel reads the float32 cos/sin tables by position itself (no
gathered copy) and rounds as the reference does, so the result is bit-identical:
  cos, sin = table[position] rounded to the activation dtype
  first'  = round(round(first * cos) - round(second * sin))
  second' = round(round(second * cos) + round(first * sin))
where round() is to the activation dtype and each product and sum is computed in float32 (exact
for fp16/bf16 operands, as in torch's elementwise kernels). Contraction into fma is disabled, which
would otherwise skip the rounding of the products in float32.

q and k may be strided views (e.g. slices of the fused qkv projection's output): any token and
head strides, a last stride of 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def rotate_token_heads(
    src_ptr,
    src_head_stride,
    dst_ptr,
    dst_head_stride,
    cos,
    sin,
    NUM_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """Rotates the heads of one token (the pointers are at its head 0) in blocks of BLOCK_H,
    rounding to src's dtype as the reference does, then storing in dst's dtype (a KV cache of
    another dtype converts as `Tensor.to` would). src and dst may be the same heads."""
    dtype = src_ptr.dtype.element_ty
    dims = tl.arange(0, BLOCK_HALF)
    for head_start in range(0, NUM_HEADS, BLOCK_H):
        heads = head_start + tl.arange(0, BLOCK_H)
        mask = (heads[:, None] < NUM_HEADS) & (dims[None, :] < HALF)
        src_ptrs = src_ptr + heads[:, None].to(tl.int64) * src_head_stride + dims[None, :]
        dst_ptrs = dst_ptr + heads[:, None].to(tl.int64) * dst_head_stride + dims[None, :]
        first = tl.load(src_ptrs, mask=mask, other=0.0).to(tl.float32)
        second = tl.load(src_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
        new_first = (first * cos).to(dtype).to(tl.float32) - (second * sin).to(dtype).to(tl.float32)
        new_second = (second * cos).to(dtype).to(tl.float32) + (first * sin).to(dtype).to(
            tl.float32
        )
        out_dtype = dst_ptr.dtype.element_ty
        tl.store(dst_ptrs, new_first.to(dtype).to(out_dtype), mask=mask)
        tl.store(dst_ptrs + HALF, new_second.to(dtype).to(out_dtype), mask=mask)


@triton.jit
def token_cos_sin(
    positions_ptr,
    token,
    cos_ptr,
    sin_ptr,
    table_stride,
    activation_ptr,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """cos and sin of one token's position, [1, BLOCK_HALF] float32 values rounded to the
    activation dtype (`activation_ptr`'s) first, as the reference casts the tables."""
    dtype = activation_ptr.dtype.element_ty
    position = tl.load(positions_ptr + token).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)
    dim_mask = dims < HALF
    cos = tl.load(cos_ptr + position * table_stride + dims, mask=dim_mask, other=0.0)
    sin = tl.load(sin_ptr + position * table_stride + dims, mask=dim_mask, other=0.0)
    return cos.to(dtype).to(tl.float32)[None, :], sin.to(dtype).to(tl.float32)[None, :]


@triton.jit
def position_cos_sin(
    position, cos_ptr, sin_ptr, table_stride, dtype, HALF: tl.constexpr, HEAD_DIM_PAD: tl.constexpr
):
    """cos and sin of `position` for each dim of a whole head, [HEAD_DIM_PAD] float32 (dim d and
    d + HALF share an angle; padding dims 0), rounded to `dtype` first like `token_cos_sin`."""
    dims = tl.arange(0, HEAD_DIM_PAD)
    valid = dims < 2 * HALF
    angle = position.to(tl.int64) * table_stride + dims % HALF
    cos = tl.load(cos_ptr + angle, mask=valid, other=0.0)
    sin = tl.load(sin_ptr + angle, mask=valid, other=0.0)
    return cos.to(dtype).to(tl.float32), sin.to(dtype).to(tl.float32)


@triton.jit
def rotated_heads(
    head_ptrs,
    head_valid,
    cos,
    sin,
    HALF: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    NO_CONTRACT: tl.constexpr,
):
    """[G, HEAD_DIM_PAD] heads loaded from `head_ptrs` ([G] pointers to each head's dim 0, dims
    contiguous) and rotated by `position_cos_sin`'s cos/sin, rounded exactly as
    `rotate_token_heads` rounds (in the heads' dtype; padding rows and dims 0). NO_CONTRACT
    keeps each product's own rounding in a kernel compiled with contraction on (CUDA)."""
    dtype = head_ptrs.dtype.element_ty
    dims = tl.arange(0, HEAD_DIM_PAD)
    mask = head_valid[:, None] & (dims < 2 * HALF)[None, :]
    partner = tl.where(dims < HALF, dims + HALF, dims - HALF)
    x = tl.load(head_ptrs[:, None] + dims[None, :], mask=mask, other=0.0).to(tl.float32)
    other = tl.load(head_ptrs[:, None] + partner[None, :], mask=mask, other=0.0).to(tl.float32)
    if NO_CONTRACT:
        x_cos = libdevice.mul_rn(x, cos[None, :])
        other_sin = libdevice.mul_rn(other, sin[None, :])
    else:
        x_cos = x * cos[None, :]
        other_sin = other * sin[None, :]
    x_cos = x_cos.to(dtype).to(tl.float32)
    other_sin = other_sin.to(dtype).to(tl.float32)
    # first' = first cos - second sin; second' = second cos + first sin
    return tl.where(dims[None, :] < HALF, x_cos - other_sin, x_cos + other_sin).to(dtype)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    positions_ptr,
    cos_ptr,
    sin_ptr,
    q_token_stride,
    q_head_stride,
    k_token_stride,
    k_head_stride,
    table_stride,
    NUM_Q_HEADS: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    cos, sin = token_cos_sin(
        positions_ptr, token, cos_ptr, sin_ptr, table_stride, q_ptr, HALF, BLOCK_HALF
    )
    q_token = q_ptr + token * q_token_stride
    rotate_token_heads(
        q_token,
        q_head_stride,
        q_token,
        q_head_stride,
        cos,
        sin,
        NUM_Q_HEADS,
        HALF,
        BLOCK_H,
        BLOCK_HALF,
    )
    k_token = k_ptr + token * k_token_stride
    rotate_token_heads(
        k_token,
        k_head_stride,
        k_token,
        k_head_stride,
        cos,
        sin,
        NUM_K_HEADS,
        HALF,
        BLOCK_H,
        BLOCK_HALF,
    )


def rotary_blocks(max_heads: int, half: int) -> tuple[int, int]:
    """(BLOCK_H, BLOCK_HALF) of `rotate_token_heads`: up to 2048 elements of a half per block."""
    block_half = triton.next_power_of_2(half)
    return max(1, min(triton.next_power_of_2(max_heads), 2048 // block_half)), block_half


def apply_rotary_inplace(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
) -> None:
    """Rotates q [T, q_heads, head_dim] and k [T, k_heads, head_dim] in place.

    positions: [T] integers, each in [0, table rows): not checked (that would need a host sync),
    a position past the table reads out of bounds. cos_table, sin_table: float32
    [rows, head_dim / 2] with a last stride of 1. q and k share a dtype and must not overlap.
    """
    check_rotary_inputs(q, k, positions, cos_table, sin_table)
    num_tokens, num_q_heads, head_dim = q.shape
    if num_tokens == 0:
        return
    half = head_dim // 2
    block_h, block_half = rotary_blocks(max(num_q_heads, k.shape[1]), half)
    _rotary_kernel[(num_tokens,)](
        q,
        k,
        positions,
        cos_table,
        sin_table,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos_table.stride(0),
        NUM_Q_HEADS=num_q_heads,
        NUM_K_HEADS=k.shape[1],
        HALF=half,
        BLOCK_H=block_h,
        BLOCK_HALF=block_half,
        num_warps=4,
        enable_fp_fusion=False,
    )


def check_rotary_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
) -> None:
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(
            f"q and k must be [T, heads, head_dim] of one T and head_dim, got {tuple(q.shape)} "
            f"and {tuple(k.shape)}"
        )
    if q.dtype != k.dtype:
        raise ValueError(f"q and k must share a dtype, got {q.dtype} and {k.dtype}")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("q and k need a last stride of 1")
    half = q.shape[2] // 2
    if q.shape[2] % 2 or cos_table.shape[-1] != half or sin_table.shape != cos_table.shape:
        raise ValueError(
            f"cos/sin tables {tuple(cos_table.shape)} do not fit head_dim {q.shape[2]}"
        )
    if cos_table.dtype != torch.float32 or sin_table.dtype != torch.float32:
        raise ValueError("cos/sin tables must be float32")
    if cos_table.stride(-1) != 1 or sin_table.stride() != cos_table.stride():
        raise ValueError("cos/sin tables need a last stride of 1 and equal strides")
    if positions.shape != (q.shape[0],):
        raise ValueError(f"positions {tuple(positions.shape)} do not match {q.shape[0]} tokens")
    if not (q.device == k.device == positions.device == cos_table.device == sin_table.device):
        raise ValueError("q, k, positions and the tables must be on one device")
