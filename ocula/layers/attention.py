"""The attention layer of a decoder: stores this step's K/V in the paged pool, then attends.

The attention computation itself is a pluggable backend. Backends are registered by name as
"module:attribute" strings and imported on first use, so a backend whose dependency (Triton) is
missing never breaks `import ocula`; the engine picks one by name (its CLI choices come from
`ATTENTION_BACKENDS`) and passes the object to the model.

Backend contract (the one `ocula.attention.reference` documents): when `attend` runs, the new
tokens' K/V are already in the pool, so each sequence attends over its whole context slots. A
backend may also offer `attend_rotating` (the Triton one does), which takes q and k unrotated and
the new K/V not stored yet, and returns None for a step it does not take; `Attention` then
rotates, stores and calls `attend`.
"""

from __future__ import annotations

import importlib
from typing import Protocol

import torch
from torch import nn

from ocula.attention.reference import paged_attention_reference
from ocula.attention.registry import ATTENTION_BACKENDS
from ocula.engine.forward_batch import ForwardBatch
from ocula.layers.rotary import Rope


class AttentionBackend(Protocol):
    def attend(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        batch: ForwardBatch,
        scale: float,
        sliding_window: int | None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q [T, heads, head_dim]; caches [slots, kv_heads, head_dim] -> [T, heads, head_dim],
        written into `out` when given (rows no sequence of the batch covers are left as they
        were) and returned."""
        ...


class ReferenceBackend:
    """Plain torch, one sequence at a time: the CPU path and the oracle of the kernels."""

    def attend(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        batch: ForwardBatch,
        scale: float,
        sliding_window: int | None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        result = paged_attention_reference(q, k_cache, v_cache, batch, scale, sliding_window)
        if out is None:
            return result
        covered = sum(batch.query_lens_cpu)  # rows past the batch's tokens stay as they were
        out[:covered] = result[:covered]
        return out


def get_attention_backend(name: str = "reference") -> AttentionBackend:
    """Instantiates the backend registered as `name`."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(
            f"unknown attention backend {name!r}; available: {', '.join(sorted(ATTENTION_BACKENDS))}"
        )
    module_name, class_name = ATTENTION_BACKENDS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)()


class Attention(nn.Module):
    """Paged multi-head attention with GQA over one layer of `batch.kv_pool`.

    Head counts are those of this rank. `layer_id` selects the pool layer, so it must be unique
    and in [0, num_layers) for the pool the engine built from `model.kv_cache_shape()`.
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        layer_id: int,
        sliding_window: int | None = None,
        backend: AttentionBackend | None = None,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"{num_heads} query heads cannot share {num_kv_heads} KV heads evenly")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.layer_id = layer_id
        self.sliding_window = sliding_window
        self.backend = backend if backend is not None else ReferenceBackend()

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: ForwardBatch,
        rope: Rope | None = None,
    ) -> torch.Tensor:
        """q [T, heads, head_dim], k/v [T, kv_heads, head_dim] -> [T, heads * head_dim].

        With `rope`, q and k are rotated here, together with the K/V store (one launch on the
        kernel path, none of its own when the backend's `attend_rotating` takes the step); q and
        k are consumed either way."""
        tables = rope.kernel_tables() if rope is not None else None
        rotating = getattr(self.backend, "attend_rotating", None)
        if tables is not None and rotating is not None:  # may rotate and store inside itself
            k_cache, v_cache = batch.kv_pool.layer(self.layer_id)
            out = rotating(
                q, k, v, k_cache, v_cache, batch, self.scale, self.sliding_window, *tables
            )
            if out is not None:
                return out.reshape(out.shape[0], self.num_heads * self.head_dim)
        if rope is None:
            batch.kv_pool.write(self.layer_id, batch.out_slots, k, v)
        else:
            q = rope.rotate_and_store(q, k, v, batch.kv_pool, self.layer_id, batch.out_slots)
        k_cache, v_cache = batch.kv_pool.layer(self.layer_id)
        out = self.backend.attend(q, k_cache, v_cache, batch, self.scale, self.sliding_window)
        return out.reshape(out.shape[0], self.num_heads * self.head_dim)

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"layer={self.layer_id}, sliding_window={self.sliding_window}"
        )
