"""Attention over the paged KV cache in plain torch: the CPU path and the GPU kernels' oracle.

Contract shared with every backend: the new tokens' K/V have already been written to the pool
(`kv_pool.write`) before attention runs, so each sequence attends over
`forward_batch.context_slots(b)`, i.e. its cached prefix followed by its own new tokens. New token
i of a sequence with context length L and n new tokens sits at position L - n + i and sees keys
0..L - n + i (causal), restricted to the last `sliding_window` positions when that is set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ocula.engine.forward_batch import ForwardBatch


def paged_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: ForwardBatch,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """q: [T, num_heads, head_dim]; caches: [slots, num_kv_heads, head_dim] -> [T, num_heads, head_dim]."""
    num_heads = q.shape[1]
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    start = 0
    for b, (n_new, ctx) in enumerate(zip(batch.query_lens_cpu, batch.seq_lens_cpu, strict=True)):
        slots = batch.context_slots(b)
        k = k_cache[slots].to(q.dtype).transpose(0, 1)  # [Hkv, ctx, D]
        v = v_cache[slots].to(q.dtype).transpose(0, 1)
        if group > 1:
            k = k.repeat_interleave(group, dim=0)
            v = v.repeat_interleave(group, dim=0)
        q_b = q[start : start + n_new].transpose(0, 1)  # [H, n_new, D]
        q_pos = torch.arange(ctx - n_new, ctx, device=q.device)[:, None]
        k_pos = torch.arange(ctx, device=q.device)[None, :]
        visible = k_pos <= q_pos
        if sliding_window is not None:
            visible &= k_pos > q_pos - sliding_window
        o = F.scaled_dot_product_attention(q_b, k, v, attn_mask=visible, scale=scale)
        out[start : start + n_new] = o.transpose(0, 1)
        start += n_new
    return out
