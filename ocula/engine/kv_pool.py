"""The device-side KV cache: one pre-allocated pool of token slots per layer.

Slots are token-granular. Slot 0 is reserved as a scratch slot: padded tokens (for example the
unused rows of a CUDA-graph batch) write their K/V there, so it is never handed to a request.
Which slots are free is the business of `SlotAllocator` (CPU); this class only owns tensors.

On CUDA (`use_triton`) `write` is one Triton launch for K and V (`ocula.kernels.kv_store`), which
reads nothing back to the host and so can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch

from ocula.kernels import use_triton

SCRATCH_SLOT = 0


class KVCachePool:
    """K and V tensors of shape [num_slots + 1, num_kv_heads, head_dim] for each layer."""

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if num_slots < 1:
            raise ValueError(f"a KV pool needs at least one slot, got {num_slots}")
        self.num_slots = num_slots
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        shape = (num_slots + 1, num_kv_heads, head_dim)
        self.k_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_token(
        num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        """Bytes one token's K and V take over all layers (what sizing the pool divides by)."""
        element_size = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * num_kv_heads * head_dim * element_size

    def layer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k_caches[layer_id], self.v_caches[layer_id]

    def write(self, layer_id: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stores the K/V of new tokens ([T, num_kv_heads, head_dim]) at `slots` ([T] int64).

        k and v may be strided views (last stride 1 on the kernel path); they are converted to
        the pool's dtype. Slots must be distinct apart from the scratch slot.
        """
        if use_triton(k):
            from ocula.kernels.kv_store import store_kv

            store_kv(k, v, self.k_caches[layer_id], self.v_caches[layer_id], slots)
            return
        self.k_caches[layer_id][slots] = k.to(self.dtype)
        self.v_caches[layer_id][slots] = v.to(self.dtype)
