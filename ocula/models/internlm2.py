"""InternLM2 (and InternLM2.5): the Llama decoder under InternLM2's own names.

The outer tree keeps the checkpoint's names (`model.tok_embeddings`, `model.layers.N.attention`,
`feed_forward`, `attention_norm`, `ffn_norm`, `model.norm`, `output`); the projections inside map
onto the shared blocks: `wqkv` -> `qkv_proj`, `wo` -> `o_proj`, `w1`/`w3` -> `gate_up_proj` shards
0/1, `w2` -> `down_proj`.

`wqkv` is packed per KV group: for each KV head g, its `q_per_kv` query heads, then K head g, then
V head g, `head_dim` rows each. Its loader reads exactly the heads this rank holds, one head at a
time, so it is right for every TP size, including KV heads replicated over several ranks.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig

from ocula.distributed.parallel_group import SINGLE_RANK, ParallelGroup
from ocula.engine.forward_batch import ForwardBatch
from ocula.layers.attention import AttentionBackend
from ocula.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from ocula.layers.linear import (
    CheckpointTensor,
    QKVParallelLinear,
    ShardId,
    checkpoint_shape,
    narrow_checkpoint,
)
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


def load_grouped_wqkv(
    qkv: QKVParallelLinear,
    param: nn.Parameter,
    loaded: CheckpointTensor,
    shard_id: ShardId = None,
) -> None:
    """weight_loader of `qkv_proj` weight and bias when the checkpoint packs them as `wqkv`."""
    head_dim = qkv.head_dim
    q_per_kv = qkv.num_heads // qkv.num_kv_heads
    group_rows = (q_per_kv + 2) * head_dim
    expected_rows = qkv.num_kv_heads * group_rows
    if checkpoint_shape(loaded)[0] != expected_rows:
        raise ValueError(
            f"wqkv has {checkpoint_shape(loaded)[0]} rows, expected {expected_rows} "
            f"({qkv.num_kv_heads} KV groups of {q_per_kv} q + 1 k + 1 v heads of {head_dim})"
        )

    def packed_start(projection: str, head: int) -> int:
        if projection == "q":
            group, slot = divmod(head, q_per_kv)
        else:
            group, slot = head, q_per_kv + (0 if projection == "k" else 1)
        return group * group_rows + slot * head_dim

    for projection in QKVParallelLinear.SHARDS:
        pieces = [
            narrow_checkpoint(loaded, 0, packed_start(projection, head), head_dim)
            for head in qkv.local_heads(projection)
        ]
        qkv.copy_shard(param, projection, torch.cat(pieces))


class InternLM2DecoderLayer(nn.Module):
    def __init__(
        self,
        config: PretrainedConfig,
        layer_id: int,
        tp: ParallelGroup,
        backend: AttentionBackend | None,
    ) -> None:
        super().__init__()
        bias = bool(getattr(config, "attention_bias", False))
        self.attention = SelfAttention(config, layer_id, tp, bias, bias, backend)
        qkv = self.attention.qkv_proj
        for param in qkv.parameters():
            param.weight_loader = partial(load_grouped_wqkv, qkv)
        self.feed_forward = GatedMLP(
            config.hidden_size, config.intermediate_size, config.hidden_act, False, tp
        )
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        hidden: torch.Tensor | None,
        residual: Residual,
        rope: Rope,
        batch: ForwardBatch,
    ) -> tuple[torch.Tensor | None, Residual]:
        return pre_norm_residual_step(
            self.attention_norm,
            self.attention,
            self.ffn_norm,
            self.feed_forward,
            hidden,
            residual,
            rope,
            batch,
        )


class InternLM2Model(nn.Module):
    def __init__(
        self, config: PretrainedConfig, tp: ParallelGroup, backend: AttentionBackend | None
    ) -> None:
        super().__init__()
        self.tok_embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(
            InternLM2DecoderLayer(config, i, tp, backend) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config, head_dim_of(config))

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        return run_decoder(self.tok_embeddings, self.layers, self.norm, self.rotary_emb, batch)


class InternLM2ForCausalLM(nn.Module):
    # checkpoint module name -> (module in this model, shard id of the fused parameter)
    packed_modules_mapping: ClassVar[PackedMapping] = {
        "wqkv": ("qkv_proj", None),
        "wo": ("o_proj", None),
        "w1": ("gate_up_proj", 0),
        "w3": ("gate_up_proj", 1),
        "w2": ("down_proj", None),
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
        self.model = InternLM2Model(config, tp, attention_backend)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.output = ParallelLMHead(
            config.vocab_size,
            config.hidden_size,
            tp,
            tie_to=self.model.tok_embeddings if self.tie_word_embeddings else None,
        )

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Final hidden states [T, hidden] of every new token of the batch."""
        return self.model(batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [S, hidden] (rows picked by the caller) -> float32 logits [S, vocab]."""
        return self.output.compute_logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, CheckpointTensor]]) -> set[WeightKey]:
        ignored = frozenset({"output.weight"}) if self.tie_word_embeddings else frozenset()
        return load_named_weights(self, weights, self.packed_modules_mapping, ignored)

    def max_context_len(self) -> int:
        """Longest sequence (prompt + output) the rotary table covers; longer ones cannot run."""
        return self.model.rotary_emb.max_positions

    def kv_cache_shape(self) -> tuple[int, int, int]:
        """(num_layers, num_kv_heads on this rank, head_dim) of the KV pool this model needs."""
        qkv = self.model.layers[0].attention.qkv_proj
        return len(self.model.layers), qkv.num_kv_heads_per_rank, qkv.head_dim
