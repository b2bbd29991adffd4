"""FLOPs and bytes of the work the benchmarks time: the limits their ratios are taken against.

Counting conventions (the report repeats them):
- a matmul of [m, k] x [k, n] is 2mkn FLOPs; norms, activations, rotary and softmax are not
  counted (they are memory-bound and small);
- causal attention over a prompt of n new tokens after c cached ones: each new token i attends to
  c + i keys, QK^T and PV cost 2 * head_dim FLOPs per (query, key, head) each, so
  4 * layers * heads * head_dim * sum_i (c + i);
- prefill computes logits for one row per request (the sampled position);
- a decode step must read every weight of the language model once, except the input embedding
  table, of which it reads only the B rows it looks up (unless tied to the LM head), plus the
  K and V of every context token of every sequence (the step's own token included).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class DecoderCost:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, text_config: Any) -> DecoderCost:
        heads = int(text_config.num_attention_heads)
        hidden = int(text_config.hidden_size)
        head_dim = getattr(text_config, "head_dim", None) or hidden // heads
        return cls(
            hidden=hidden,
            layers=int(text_config.num_hidden_layers),
            heads=heads,
            kv_heads=int(getattr(text_config, "num_key_value_heads", None) or heads),
            head_dim=int(head_dim),
            intermediate=int(text_config.intermediate_size),
            vocab=int(text_config.vocab_size),
        )

    @property
    def linear_params(self) -> int:
        """Weights of the decoder layers' matmuls (q, k, v, o, gate, up, down), all layers."""
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        per_layer = self.hidden * (q_out + 2 * kv_out) + q_out * self.hidden
        per_layer += 3 * self.hidden * self.intermediate
        return self.layers * per_layer

    def prefill_flops(self, new_tokens: int, cached_tokens: int = 0, logit_rows: int = 1) -> float:
        keys = new_tokens * cached_tokens + new_tokens * (new_tokens + 1) / 2
        attention = 4 * self.layers * self.heads * self.head_dim * keys
        return (
            2 * self.linear_params * new_tokens
            + attention
            + 2 * self.hidden * self.vocab * logit_rows
        )


def vit_flops_per_tile(vlm_config: Any) -> float:
    """One tile through the ViT layers the engine runs, the pixel shuffle and the projector.

    Per layer over n = 1 + (S/p)^2 tokens of width C with MLP width I: 2n(4C^2 + 2CI) for the
    matmuls plus 4n^2 C for bidirectional attention; the patch embedding is a [(S/p)^2, 3p^2] x
    [3p^2, C] matmul; the projector maps each of the tile's tokens from s^2 C to the LLM width H
    and then H to H (s = 1 / downsample_ratio).
    """
    from ocula.models.intern_vit import layers_needed

    vision = vlm_config.vision_config
    width, mlp = vision.hidden_size, vision.intermediate_size
    patches = (vlm_config.image_size // vision.patch_size) ** 2
    tokens = patches + 1
    layers = layers_needed(vision.num_hidden_layers, vlm_config.select_layer)
    per_layer = 2 * tokens * (4 * width * width + 2 * width * mlp) + 4 * tokens * tokens * width
    patch_embed = 2 * patches * 3 * vision.patch_size**2 * width
    shuffled = width * round(1 / vlm_config.downsample_ratio) ** 2
    llm_width = vlm_config.text_config.hidden_size
    projector = 2 * vlm_config.tokens_per_tile * (shuffled * llm_width + llm_width * llm_width)
    return layers * per_layer + patch_embed + projector


def language_model(model: nn.Module) -> nn.Module:
    return getattr(model, "language_model", model)


def decode_weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the language model's weights: all of them, and those a decode step reads."""
    lm = language_model(model)
    total = sum(p.numel() * p.element_size() for p in lm.parameters())
    embedding = 0
    tied = bool(getattr(lm, "tie_word_embeddings", False))
    for name, param in lm.named_parameters():
        if name.endswith(("embed_tokens.weight", "tok_embeddings.weight")) and not tied:
            embedding += param.numel() * param.element_size()
    return {"all": total, "embedding_table": embedding, "read_per_step": total - embedding}


def kv_bytes_per_token(model: nn.Module, element_size: int) -> int:
    layers, kv_heads, head_dim = model.kv_cache_shape()
    return 2 * layers * kv_heads * head_dim * element_size


def decode_step_bytes(weight_bytes: int, kv_per_token: int, context_lens: list[int]) -> int:
    return weight_bytes + kv_per_token * sum(context_lens)


def workload_floor(
    cost: DecoderCost,
    prompt_lens: list[int],
    new_tokens: int,
    weight_bytes: int,
    kv_per_token: int,
    bandwidth: float,
    matmul_flops: float,
    extra_flops: float = 0.0,
) -> dict[str, float]:
    """Seconds the hardware needs at least for an offline workload whose requests all decode
    together: every prompt's prefill (plus `extra_flops`, e.g. the ViT) at the matmul peak, then
    `new_tokens - 1` decode steps (prefill yields the first token) each reading the weights and
    every sequence's K/V at the copy bandwidth."""
    prefill = sum(cost.prefill_flops(n) for n in prompt_lens) + extra_flops
    steps = new_tokens - 1
    contexts = steps * sum(prompt_lens) + len(prompt_lens) * steps * (steps + 1) // 2
    decode_bytes = steps * weight_bytes + kv_per_token * contexts
    prefill_s, decode_s = prefill / matmul_flops, decode_bytes / bandwidth
    return {
        "prefill_flops": prefill,
        "decode_bytes": float(decode_bytes),
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "floor_s": prefill_s + decode_s,
    }
