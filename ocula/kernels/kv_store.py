"""Writes one step's K and V into a layer's paged caches at the tokens' slots, in one launch.

The torch reference is the indexed assignment in `KVCachePool.write`
(`k_cache[slots] = k.to(cache dtype)`, the same for v); a copy (with the same round-to-nearest
conversion when the dtypes differ) is bit-identical to it. The launch depends only on shapes, so
it can be captured in a CUDA graph: nothing is read back to the host, and slots are not checked.

Slots must be distinct, except the scratch slot that padded tokens share (which of them lands
there is unspecified, as with the indexed assignment).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def copy_token_heads(
    src_ptr,
    src_head_stride,
    dst_ptr,
    dst_head_stride,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    dims = tl.arange(0, BLOCK_D)
    for head_start in range(0, NUM_HEADS, BLOCK_H):
        heads = (head_start + tl.arange(0, BLOCK_H)).to(tl.int64)
        mask = (heads[:, None] < NUM_HEADS) & (dims[None, :] < HEAD_DIM)
        values = tl.load(src_ptr + heads[:, None] * src_head_stride + dims[None, :], mask=mask)
        tl.store(
            dst_ptr + heads[:, None] * dst_head_stride + dims[None, :],
            values.to(dst_ptr.dtype.element_ty),
            mask=mask,
        )


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slots_ptr,
    k_token_stride,
    k_head_stride,
    v_token_stride,
    v_head_stride,
    k_cache_slot_stride,
    k_cache_head_stride,
    v_cache_slot_stride,
    v_cache_head_stride,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    copy_token_heads(
        k_ptr + token * k_token_stride,
        k_head_stride,
        k_cache_ptr + slot * k_cache_slot_stride,
        k_cache_head_stride,
        NUM_HEADS,
        HEAD_DIM,
        BLOCK_H,
        BLOCK_D,
    )
    copy_token_heads(
        v_ptr + token * v_token_stride,
        v_head_stride,
        v_cache_ptr + slot * v_cache_slot_stride,
        v_cache_head_stride,
        NUM_HEADS,
        HEAD_DIM,
        BLOCK_H,
        BLOCK_D,
    )


def copy_blocks(num_heads: int, head_dim: int) -> tuple[int, int]:
    """(BLOCK_H, BLOCK_D) of `copy_token_heads`: up to 4096 elements per block."""
    block_d = triton.next_power_of_2(head_dim)
    return max(1, min(triton.next_power_of_2(num_heads), 4096 // block_d)), block_d


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """k_cache[slots[t]] = k[t] and v_cache[slots[t]] = v[t] for every token t.

    k, v: [T, kv_heads, head_dim], any strides with a last stride of 1 (views of the qkv output
    need no copy). Caches: [num_slots, kv_heads, head_dim], last stride 1; their dtype may differ
    from k/v's (converted on store). slots: [T] integers in [0, num_slots).
    """
    check_kv_inputs(k, v, k_cache, v_cache, slots)
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    block_h, block_d = copy_blocks(num_heads, head_dim)
    _store_kv_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slots,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        NUM_HEADS=num_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        num_warps=4,
    )


def check_kv_inputs(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(
            f"k and v must both be [T, kv_heads, head_dim], got {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k_cache.dim() != 3 or k_cache.shape[1:] != k.shape[1:] or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)} do not hold "
            f"[*, {k.shape[1]}, {k.shape[2]}] entries"
        )
    if any(t.stride(-1) != 1 for t in (k, v, k_cache, v_cache)):
        raise ValueError("k, v and the caches need a last stride of 1")
    if slots.shape != (k.shape[0],) or slots.dtype.is_floating_point:
        raise ValueError(
            f"slots must be [{k.shape[0]}] integers, got {slots.dtype} {tuple(slots.shape)}"
        )
    if not (k.device == v.device == k_cache.device == v_cache.device == slots.device):
        raise ValueError("k, v, the caches and slots must be on one device")
