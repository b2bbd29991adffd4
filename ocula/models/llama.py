"""Llama, Mistral and Qwen2: one decoder, the differences read from the config.

- Qwen2 always has q/k/v biases (no o_proj bias); Llama has them when `attention_bias` (o_proj
  too) and MLP biases when `mlp_bias`; Mistral has none.
- Sliding-window attention per layer: see `decoder_blocks.sliding_window_of`.
- `head_dim` comes from the config when it is set; `tie_word_embeddings` shares the embedding.

The module tree mirrors the checkpoint's (`model.embed_tokens`, `model.layers.N.self_attn`, ...);
only q/k/v and gate/up are fused, as `packed_modules_mapping` declares.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig

from ocula.distributed.parallel_group import SINGLE_RANK, ParallelGroup
from ocula.engine.forward_batch import ForwardBatch
from ocula.layers.attention import AttentionBackend
from ocula.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from ocula.layers.linear import CheckpointTensor
from ocula.layers.norm import RMSNorm
from ocula.layers.rotary import RotaryEmbedding
from ocula.models.decoder_blocks import (
    GatedMLP,
    Residual,
    Rope,
    SelfAttention,
    head_dim_of,
    pre_norm_residual_step,
    run_decoder,
)
from ocula.models.weight_routing import PackedMapping, WeightKey, load_named_weights

# Model types whose q/k/v projections carry a bias although the config has no flag for it.
_ALWAYS_QKV_BIAS = frozenset({"qwen2"})


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        config: PretrainedConfig,
        layer_id: int,
        tp: ParallelGroup,
        backend: AttentionBackend | None,
    ) -> None:
        super().__init__()
        attention_bias = bool(getattr(config, "attention_bias", False))
        qkv_bias = attention_bias or config.model_type in _ALWAYS_QKV_BIAS
        self.self_attn = SelfAttention(config, layer_id, tp, qkv_bias, attention_bias, backend)
        self.mlp = GatedMLP(
            config.hidden_size,
            config.intermediate_size,
            config.hidden_act,
            bool(getattr(config, "mlp_bias", False)),
            tp,
        )
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        hidden: torch.Tensor | None,
        residual: Residual,
        rope: Rope,
        batch: ForwardBatch,
    ) -> tuple[torch.Tensor | None, Residual]:
        return pre_norm_residual_step(
            self.input_layernorm,
            self.self_attn,
            self.post_attention_layernorm,
            self.mlp,
            hidden,
            residual,
            rope,
            batch,
        )


class LlamaModel(nn.Module):
    def __init__(
        self, config: PretrainedConfig, tp: ParallelGroup, backend: AttentionBackend | None
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, tp, backend) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config, head_dim_of(config))

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        return run_decoder(self.embed_tokens, self.layers, self.norm, self.rotary_emb, batch)


class LlamaForCausalLM(nn.Module):
    # checkpoint module name -> (module in this model, shard id of the fused parameter)
    packed_modules_mapping: ClassVar[PackedMapping] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(
        self,
        config: PretrainedConfig,
        tp: ParallelGroup = SINGLE_RANK,
        attention_backend: AttentionBackend | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.tp = tp
        self.model = LlamaModel(config, tp, attention_backend)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(
            config.vocab_size,
            config.hidden_size,
            tp,
            tie_to=self.model.embed_tokens if self.tie_word_embeddings else None,
        )

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Final hidden states [T, hidden] of every new token of the batch."""
        return self.model(batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [S, hidden] (rows picked by the caller) -> float32 logits [S, vocab]."""
        return self.lm_head.compute_logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, CheckpointTensor]]) -> set[WeightKey]:
        # A tied checkpoint may still carry lm_head.weight: it equals the embedding, skip it.
        ignored = frozenset({"lm_head.weight"}) if self.tie_word_embeddings else frozenset()
        return load_named_weights(self, weights, self.packed_modules_mapping, ignored)

    def max_context_len(self) -> int:
        """Longest sequence (prompt + output) the rotary table covers; longer ones cannot run."""
        return self.model.rotary_emb.max_positions

    def kv_cache_shape(self) -> tuple[int, int, int]:
        """(num_layers, num_kv_heads on this rank, head_dim) of the KV pool this model needs."""
        qkv = self.model.layers[0].self_attn.qkv_proj
        return len(self.model.layers), qkv.num_kv_heads_per_rank, qkv.head_dim
