"""RoPE and the KV store of one layer's new tokens in one launch.

The unfused path is two launches per layer: `ocula.kernels.rotary` rotates q and k in place, then
`ocula.kernels.kv_store` copies k and v into the paged caches. Here each token's program rotates
its q heads in place and writes its rotated k heads and its v heads straight to the cache slot,
so k is read once and never written back. At batch 1 a decode step is a chain of small launches
between the weight streams, and one launch fewer per layer is time the GPU does not idle.

Results are bit-identical to the two kernels (and so to their torch references,
`ocula.layers.rotary.apply_rotary` and `KVCachePool.write`'s indexed assignment): the same
rounding to the activation dtype, then the cache dtype's conversion. Unlike the unfused path,
k itself is left as it was (only its cached copy is rotated): attention reads K from the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ocula.kernels import launch_with_pdl
from ocula.kernels.kv_store import check_kv_inputs, copy_blocks, copy_token_heads
from ocula.kernels.rotary import (
    check_rotary_inputs,
    rotary_blocks,
    rotate_token_heads,
    token_cos_sin,
)


@triton.jit
def _rotary_store_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    positions_ptr,
    slots_ptr,
    cos_ptr,
    sin_ptr,
    q_token_stride,
    q_head_stride,
    k_token_stride,
    k_head_stride,
    v_token_stride,
    v_head_stride,
    cache_slot_stride,
    cache_head_stride,
    table_stride,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_KV_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:  # see ocula.kernels.launch_with_pdl
        gdc_wait()
        gdc_launch_dependents()
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + token).to(tl.int64)
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
    rotate_token_heads(
        k_ptr + token * k_token_stride,
        k_head_stride,
        k_cache_ptr + slot * cache_slot_stride,
        cache_head_stride,
        cos,
        sin,
        NUM_KV_HEADS,
        HALF,
        BLOCK_H,
        BLOCK_HALF,
    )
    copy_token_heads(
        v_ptr + token * v_token_stride,
        v_head_stride,
        v_cache_ptr + slot * cache_slot_stride,
        cache_head_stride,
        NUM_KV_HEADS,
        2 * HALF,
        BLOCK_KV_H,
        BLOCK_D,
    )


def rotate_and_store_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """Rotates q [T, q_heads, head_dim] in place and stores the rotated k and the v
    ([T, kv_heads, head_dim]) at `slots` of the caches ([num_slots, kv_heads, head_dim], one
    layout for both, last stride 1; their dtype may differ from q's). k is not modified.

    The contracts of `apply_rotary_inplace` (positions, tables, strides) and of `store_kv`
    (slots distinct but for the scratch slot) hold; nothing is read back to the host.
    """
    check_rotary_inputs(q, k, positions, cos_table, sin_table)
    check_kv_inputs(k, v, k_cache, v_cache, slots)
    if k_cache.stride() != v_cache.stride():
        raise ValueError("the K and V caches must share one layout")
    num_tokens, num_q_heads, head_dim = q.shape
    if num_tokens == 0:
        return
    half = head_dim // 2
    num_kv_heads = k.shape[1]
    block_h, block_half = rotary_blocks(max(num_q_heads, num_kv_heads), half)
    block_kv_h, block_d = copy_blocks(num_kv_heads, head_dim)
    pdl = launch_with_pdl(q)
    _rotary_store_kernel[(num_tokens,)](
        q,
        k,
        v,
        k_cache,
        v_cache,
        positions,
        slots,
        cos_table,
        sin_table,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        cos_table.stride(0),
        NUM_Q_HEADS=num_q_heads,
        NUM_KV_HEADS=num_kv_heads,
        HALF=half,
        BLOCK_H=block_h,
        BLOCK_HALF=block_half,
        BLOCK_KV_H=block_kv_h,
        BLOCK_D=block_d,
        PDL=pdl,
        num_warps=4,
        enable_fp_fusion=False,  # keeps the products' rounding (see ocula.kernels.rotary)
        launch_pdl=pdl,
    )


@dataclass(frozen=True)
class NewTokens:
    """This step's new tokens, for `decode_attention` to rotate and store into the caches itself:
    their unrotated k and v ([T, kv_heads, head_dim], one layout, last stride 1), positions [T],
    cache slots [T], and the float32 RoPE tables [positions, head_dim / 2] (as
    `ocula.kernels.rotary_store.rotate_and_store_kv` takes them)."""

    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    cos_table: torch.Tensor
    sin_table: torch.Tensor


def check_new_tokens(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, new: NewTokens
) -> None:
    """Raises ValueError unless `new` fits q and the caches (the contracts of
    `rotate_and_store_kv`, and one layout for k and v)."""
    check_rotary_inputs(q, new.k, new.positions, new.cos_table, new.sin_table)
    check_kv_inputs(new.k, new.v, k_cache, v_cache, new.slots)
    if new.k.stride() != new.v.stride():
        raise ValueError("the new k and v must share one layout")
