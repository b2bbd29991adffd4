"""Rotary position embedding (neox style: the head is rotated as two halves, as in Llama).

Frequencies come from the config's `rope_parameters`: the plain formula for "default", and
transformers' `ROPE_INIT_FUNCTIONS` for the scaled types (linear, dynamic, yarn, longrope,
llama3), including their `attention_scaling` factor on cos and sin. cos/sin are precomputed in
float32 for every position below `max_positions` and looked up by position.

Length-dependent types. transformers recomputes "dynamic" (NTK) frequencies once a sequence grows
past `max_position_embeddings` and switches "longrope" to its long factors past
`original_max_position_embeddings`; the result then depends on the whole batch's length, not on a
token's position. This table holds the frequencies transformers uses below that threshold, and
`max_positions` stops at the threshold, so every sequence that fits is computed exactly as
transformers computes it. Serving longer sequences with these types is not supported: the engine
must keep context lengths within `max_positions`.

Applying it: `RotaryEmbedding.rope(positions, dtype)` binds one forward's positions into a `Rope`
that every layer calls on its (q, k). On CUDA (`use_triton`) that is one Triton launch per layer
which rotates q and k in place, reading the float32 tables by position itself
(`ocula.kernels.rotary`, bit-identical to `apply_rotary`), or with `Rope.rotate_and_store` one
launch that also writes the layer's K/V into the pool (`ocula.kernels.rotary_store`); elsewhere
cos/sin are looked up once per forward and `apply_rotary` runs out of place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from ocula.kernels import use_triton

if TYPE_CHECKING:
    from ocula.engine.kv_pool import KVCachePool


def default_inv_freq(base: float, dim: int) -> torch.Tensor:
    """Unscaled RoPE inverse frequencies, 1 / base^(2i/dim), in float32."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    return 1.0 / (base**exponents)


def rope_parameters_of(config: PretrainedConfig) -> dict:
    params = getattr(config, "rope_parameters", None)
    if not params:
        raise ValueError(
            "the config has no rope_parameters (transformers 5 keeps rope settings there)"
        )
    if "rope_type" not in params and "type" in params:
        params = {**params, "rope_type": params["type"]}
    return params


class RotaryEmbedding(nn.Module):
    def __init__(self, config: PretrainedConfig, head_dim: int) -> None:
        super().__init__()
        params = rope_parameters_of(config)
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            inv_freq, scaling = default_inv_freq(float(params["rope_theta"]), head_dim), 1.0
        elif rope_type in ROPE_INIT_FUNCTIONS:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config)
        else:
            raise ValueError(
                f"unsupported rope_type {rope_type!r}; known: default, {', '.join(ROPE_INIT_FUNCTIONS)}"
            )
        if inv_freq.shape[0] * 2 != head_dim:
            raise ValueError(
                f"rotary dimension {inv_freq.shape[0] * 2} != head_dim {head_dim}: partial rotary "
                "embeddings are not supported"
            )
        self.rope_type = rope_type
        self.max_positions = int(config.max_position_embeddings)
        if rope_type == "longrope":
            original = params.get("original_max_position_embeddings")
            self.max_positions = min(self.max_positions, int(original or self.max_positions))
        positions = torch.arange(self.max_positions, dtype=torch.int64).to(torch.float32)
        freqs = (
            positions[:, None] * inv_freq.to(positions.device, torch.float32)[None, :]
        )  # [P, head_dim / 2]
        # float32 whatever the model dtype; cast to the activation dtype at lookup time.
        self.register_buffer("cos_cache", freqs.cos() * scaling, persistent=False)
        self.register_buffer("sin_cache", freqs.sin() * scaling, persistent=False)

    def lookup(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, head_dim / 2] of each position, in `dtype` (done once per forward)."""
        return self.cos_cache[positions].to(dtype), self.sin_cache[positions].to(dtype)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> Rope:
        """The rotation of tokens at `positions` ([T], each < max_positions) in `dtype`."""
        return Rope(self, positions, dtype)


class Rope:
    """RoPE bound to one forward's positions: `rope(q, k)` rotates a layer's q and k.

    Built once per forward and shared by all layers. On the kernel path nothing is precomputed
    (each call reads the tables by position); on the torch path cos/sin are gathered here, once.
    """

    def __init__(
        self, rotary: RotaryEmbedding, positions: torch.Tensor, dtype: torch.dtype
    ) -> None:
        self.positions = positions
        self._cos_table = rotary.cos_cache
        self._sin_table = rotary.sin_cache
        # None selects the kernel path.
        self._cos_sin = None if use_triton(positions) else rotary.lookup(positions, dtype)

    def __call__(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, heads, head_dim], k [T, kv_heads, head_dim] in the dtype -> rotated (q, k).

        The kernel path rotates q and k in place and returns them; the torch path returns new
        tensors and leaves its inputs alone. Either way, use the returned tensors.
        """
        if self._cos_sin is None:
            from ocula.kernels.rotary import apply_rotary_inplace

            apply_rotary_inplace(q, k, self.positions, self._cos_table, self._sin_table)
            return q, k
        cos, sin = self._cos_sin
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def kernel_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(positions, cos table, sin table) for a kernel that rotates by itself (float32
        tables [max_positions, head_dim / 2]); None off the kernel path."""
        if self._cos_sin is not None:
            return None
        return self.positions, self._cos_table, self._sin_table

    def rotate_and_store(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        pool: KVCachePool,
        layer_id: int,
        slots: torch.Tensor,
    ) -> torch.Tensor:
        """Rotates q and k and stores k and v at `slots` of the pool's layer `layer_id`; returns
        the rotated q (use it, not q). On the kernel path that is one launch (q rotated in
        place, k only in its cached copy); otherwise `self(q, k)` then `pool.write`."""
        if self._cos_sin is None:
            from ocula.kernels.rotary_store import rotate_and_store_kv

            k_cache, v_cache = pool.layer(layer_id)
            rotate_and_store_kv(
                q, k, v, self.positions, self._cos_table, self._sin_table, k_cache, v_cache, slots
            )
            return q
        q, k = self(q, k)
        pool.write(layer_id, slots, k, v)
        return q


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates x [T, heads, head_dim] by the angles of cos/sin [T, head_dim / 2] (neox halves)."""
    first, second = x.chunk(2, dim=-1)
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
