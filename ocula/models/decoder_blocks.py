"""Blocks shared by the Llama-family decoders (Llama, Mistral, Qwen2, InternLM2).

Each model keeps its own module names for the outer tree and maps its checkpoint names onto these
blocks' fused projections in its `packed_modules_mapping`. All TP lives in the layers: the blocks
hold only this rank's heads and MLP columns, and contain no collectives.

On CUDA the layers dispatch to Triton kernels (`ocula.kernels`): fused residual-add + RMSNorm,
RoPE on the q/k views of the qkv output in the same launch as the KV store, SiLU-and-mul (at
batch 1 inside the gate/up GEMV), and the image-embedding splice below. Tensors handed to those
layers are consumed (see each layer).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import PretrainedConfig

from ocula.distributed.parallel_group import ParallelGroup
from ocula.engine.forward_batch import ForwardBatch
from ocula.kernels import use_triton
from ocula.layers.activation import SiluAndMul
from ocula.layers.attention import Attention, AttentionBackend
from ocula.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    gemv_applies,
)
from ocula.layers.norm import RMSNorm
from ocula.layers.rotary import Rope, RotaryEmbedding
from ocula.models.folded_row import FoldedResidual, folded_row_step, folds_row_norms

# What a layer passes the next beside its hidden states (see `pre_norm_residual_step`).
Residual = torch.Tensor | FoldedResidual | None


def head_dim_of(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def num_kv_heads_of(config: PretrainedConfig) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def sliding_window_of(config: PretrainedConfig, layer_id: int) -> int | None:
    """The attention window of one layer, as transformers decides it.

    With `layer_types` (Qwen2, newer configs) only "sliding_attention" layers slide; without it
    (Mistral) a set `sliding_window` applies to every layer.
    """
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer_id] == "sliding_attention" else None
    return window


class SelfAttention(nn.Module):
    """Fused q/k/v projection, rotary embedding, paged attention and output projection."""

    def __init__(
        self,
        config: PretrainedConfig,
        layer_id: int,
        tp: ParallelGroup,
        qkv_bias: bool,
        out_bias: bool,
        backend: AttentionBackend | None = None,
    ) -> None:
        super().__init__()
        head_dim = head_dim_of(config)
        num_heads = config.num_attention_heads
        self.head_dim = head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, head_dim, num_heads, num_kv_heads_of(config), qkv_bias, tp
        )
        self.o_proj = RowParallelLinear(num_heads * head_dim, config.hidden_size, out_bias, tp)
        self.attn = Attention(
            self.qkv_proj.num_heads_per_rank,
            self.qkv_proj.num_kv_heads_per_rank,
            head_dim,
            head_dim**-0.5,
            layer_id,
            sliding_window_of(config, layer_id),
            backend,
        )

    def forward(self, hidden: torch.Tensor, rope: Rope, batch: ForwardBatch) -> torch.Tensor:
        return self.o_proj(self.attend(self.qkv_proj(hidden), rope, batch))

    def attend(self, qkv: torch.Tensor, rope: Rope, batch: ForwardBatch) -> torch.Tensor:
        """Attention of the tokens' fused q/k/v projection [T, q + k + v]: the input of o_proj."""
        num_tokens = qkv.shape[0]
        q, k, v = self.qkv_proj.split_output(qkv)
        # Views of the qkv output, rotated and stored by the attention layer (in one launch on
        # the kernel path, which rotates q in place).
        q, k, v = (x.view(num_tokens, -1, self.head_dim) for x in (q, k, v))
        return self.attn(q, k, v, batch, rope)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one column-parallel matmul."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        hidden_act: str,
        bias: bool,
        tp: ParallelGroup,
    ) -> None:
        super().__init__()
        if hidden_act != "silu":
            raise ValueError(
                f"only silu gated MLPs are supported, the config asks for {hidden_act!r}"
            )
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [intermediate_size, intermediate_size], bias, tp
        )
        self.act_fn = SiluAndMul()
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj
        if gemv_applies(x, gate_up.weight, gate_up.bias):  # batch 1: the activation fused in
            from ocula.kernels.gemv_silu import gemv_silu_and_mul

            row = x.reshape(1, -1).contiguous()
            activated = gemv_silu_and_mul(row, gate_up.weight, gate_up.bias)
            return self.down_proj(activated.view(*x.shape[:-1], -1))
        return self.down_proj(self.act_fn(gate_up(x)))


def pre_norm_residual_step(
    attention_norm: RMSNorm,
    attention: SelfAttention,
    mlp_norm: RMSNorm,
    mlp: GatedMLP,
    hidden: torch.Tensor | None,
    residual: Residual,
    rope: Rope,
    batch: ForwardBatch,
) -> tuple[torch.Tensor | None, Residual]:
    """One pre-norm decoder layer with the residual carried separately.

    Invariant: the layer's true output is `hidden + residual`; the add is deferred into the next
    norm (fused), which computes it exactly as the unfused reference would. A one-row step on
    the GPU folds the norms into its GEMVs instead and carries a `FoldedResidual` (hidden None;
    see `ocula.models.folded_row`).
    """
    blocks = (attention_norm, attention, mlp_norm, mlp)
    if isinstance(residual, FoldedResidual):
        if folds_row_norms(residual.stream, *blocks):
            return folded_row_step(*blocks, None, residual, rope, batch)
        hidden, residual = residual.stream, None  # the add is done: the stream is the output
    elif (
        hidden is not None
        and (residual is None or residual.is_contiguous())  # it becomes the folded stream
        and folds_row_norms(hidden, *blocks)
    ):
        return folded_row_step(*blocks, hidden, residual, rope, batch)
    assert hidden is not None  # only a FoldedResidual comes without hidden states
    if residual is None:
        residual = hidden
        hidden = attention_norm(hidden)
    else:
        hidden, residual = attention_norm(hidden, residual)
    hidden = attention(hidden, rope, batch)
    hidden, residual = mlp_norm(hidden, residual)
    return mlp(hidden), residual


def embed_with_splice(embed_tokens: nn.Module, batch: ForwardBatch) -> torch.Tensor:
    """Token embeddings [T, hidden], with `batch.spliced_embeds` written over `spliced_rows`.

    Rows must be distinct; negative ones are skipped. On CUDA the splice is a Triton copy into the
    fresh embedding output.
    """
    hidden = embed_tokens(batch.input_ids)
    if batch.spliced_embeds is not None:
        if batch.spliced_rows is None:
            raise ValueError("spliced_embeds is set but spliced_rows is not")
        if use_triton(hidden):
            from ocula.kernels.splice import splice_rows_

            return splice_rows_(hidden, batch.spliced_rows, batch.spliced_embeds)
        keep = batch.spliced_rows >= 0  # negative rows are a graph buffer's padding
        embeds = batch.spliced_embeds[keep].to(hidden.dtype)
        hidden = hidden.index_copy(0, batch.spliced_rows[keep], embeds)
    return hidden


def run_decoder(
    embed_tokens: nn.Module,
    layers: Sequence[nn.Module],
    final_norm: RMSNorm,
    rotary: RotaryEmbedding,
    batch: ForwardBatch,
) -> torch.Tensor:
    """Embedding, every layer (called as `layer(hidden, residual, rope, batch)`), final norm."""
    hidden = embed_with_splice(embed_tokens, batch)
    rope = rotary.rope(batch.positions, hidden.dtype)
    residual: Residual = None
    state: torch.Tensor | None = hidden
    for layer in layers:
        state, residual = layer(state, residual, rope, batch)
    if isinstance(residual, FoldedResidual):
        return final_norm(residual.stream)
    assert state is not None
    if residual is None:
        return final_norm(state)
    return final_norm(state, residual)[0]
