"""Checkpoint names of both InternVL layouts -> parameters of `InternVLChatModel`.

The model's tree is the original OpenGVLab layout's (`vision_model.*`, `mlp1.*`,
`language_model.*`), so an original checkpoint maps by identity. An HF-layout checkpoint is
renamed by the tables below, declared once:
- prefixes: `model.vision_tower.` -> `vision_model.`, `model.multi_modal_projector.` -> `mlp1.`,
  `model.language_model.` -> `language_model.model.`, `lm_head.` -> `language_model.lm_head.`
  (and the legacy Llava-style prefixes transformers writes, see `HF_PREFIXES`);
- inside the vision tower and projector, whole dotted components (`encoder.layer` ->
  `encoder.layers`, `lambda_1` -> `ls1`, `linear_1` -> `1`, ...);
- HF's separate `attention.{q,k,v}_proj` become shards "q"/"k"/"v" of the fused `attn.qkv`, which
  the original layout stores stacked as one tensor (loaded as all three shards at once).

`language_model.*` tensors are handed, prefix stripped, to the language model's own
`load_weights`, so it keeps its own names and fusions (InternLM2's `wqkv`, Llama's q/k/v).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from ocula.layers.linear import CheckpointTensor, QKVParallelLinear, ShardId, load_replicated
from ocula.models.weight_routing import CheckpointMismatchError, PackedMapping, WeightKey

LANGUAGE_PREFIX = "language_model."
VISION_PREFIX = "vision_model."

# transformers saves the legacy Llava prefixes (`vision_tower.`, `multi_modal_projector.`,
# `language_model.model.`, `language_model.lm_head.`) and loads both those and its module names.
HF_PREFIXES = (
    ("model.vision_tower.", VISION_PREFIX),
    ("model.multi_modal_projector.", "mlp1."),
    ("model.language_model.", LANGUAGE_PREFIX + "model."),
    ("lm_head.", LANGUAGE_PREFIX + "lm_head."),
    ("vision_tower.", VISION_PREFIX),
    ("multi_modal_projector.", "mlp1."),
)
HF_COMPONENT_RENAMES = (
    ("embeddings.patch_embeddings.projection", "embeddings.patch_embedding"),
    ("embeddings.cls_token", "embeddings.class_embedding"),
    ("embeddings.position_embeddings", "embeddings.position_embedding"),
    ("encoder.layer", "encoder.layers"),
    ("attention.projection_layer", "attn.proj"),
    ("attention.q_norm", "attn.q_norm"),
    ("attention.k_norm", "attn.k_norm"),
    ("layernorm_before", "norm1"),
    ("layernorm_after", "norm2"),
    ("lambda_1", "ls1"),
    ("lambda_2", "ls2"),
    ("layernorm", "final_layernorm"),
    ("layer_norm", "0"),
    ("linear_1", "1"),
    ("linear_2", "3"),
)
# HF checkpoint module -> (module of the model, shard of the fused parameter).
HF_VISION_FUSED: PackedMapping = {
    "attention.q_proj": ("attn.qkv", "q"),
    "attention.k_proj": ("attn.qkv", "k"),
    "attention.v_proj": ("attn.qkv", "v"),
}
# HF vision tensors transformers keeps but InternVL never uses.
HF_UNUSED_VISION = ("embeddings.mask_token",)

# The fused ViT parameter and its shards, as completeness checks read them (see weight_routing):
# both layouts must provide q, k and v of every `qkv`.
VISION_PACKED_MAPPING: PackedMapping = {
    key: (target.rsplit(".", 1)[-1], shard) for key, (target, shard) in HF_VISION_FUSED.items()
}


def _replace_component(name: str, old: str, new: str) -> str:
    """Replaces `old` in `name` where it spans whole dotted components."""
    return f".{name}.".replace(f".{old}.", f".{new}.")[1:-1]


def hf_to_model_name(name: str) -> tuple[str, ShardId] | None:
    """An HF-layout tensor name -> (parameter name, shard id); None for tensors to skip."""
    for old_prefix, new_prefix in HF_PREFIXES:
        if name.startswith(old_prefix):
            name = new_prefix + name.removeprefix(old_prefix)
            break
    if name.startswith(LANGUAGE_PREFIX):
        return name, None
    if any(name == VISION_PREFIX + unused for unused in HF_UNUSED_VISION):
        return None
    for old, new in HF_COMPONENT_RENAMES:
        name = _replace_component(name, old, new)
    for old, (new, shard_id) in HF_VISION_FUSED.items():
        renamed = _replace_component(name, old, new)
        if renamed != name:
            return renamed, shard_id
    return name, None


def _unused_vision_layer(name: str, num_layers: int) -> bool:
    """A tensor of a ViT layer past the one `select_layer` reads (those are not built)."""
    prefix = VISION_PREFIX + "encoder.layers."
    if not name.startswith(prefix):
        return False
    index = name.removeprefix(prefix).split(".", 1)[0]
    return index.isdigit() and int(index) >= num_layers


def load_internvl_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, CheckpointTensor]],
    layout: str,
) -> set[WeightKey]:
    """Loads every tensor of `weights` into `model` (an InternVLChatModel); returns the keys.

    Raises CheckpointMismatchError naming the tensors that have no parameter.
    """
    if layout not in ("original", "hf"):
        raise ValueError(f"unknown InternVL checkpoint layout {layout!r}")
    params = dict(model.named_parameters())
    num_vit_layers = model.vision_model.num_layers
    language_weights: list[tuple[str, CheckpointTensor]] = []
    loaded: set[WeightKey] = set()
    unexpected: list[str] = []
    for checkpoint_name, tensor in weights:
        routed = hf_to_model_name(checkpoint_name) if layout == "hf" else (checkpoint_name, None)
        if routed is None:
            continue
        name, shard_id = routed
        if name.startswith(LANGUAGE_PREFIX):
            language_weights.append((name.removeprefix(LANGUAGE_PREFIX), tensor))
            continue
        if _unused_vision_layer(name, num_vit_layers):
            continue
        param = params.get(name)
        if param is None:
            unexpected.append(checkpoint_name)
            continue
        getattr(param, "weight_loader", load_replicated)(param, tensor, shard_id)
        if name.endswith((".attn.qkv.weight", ".attn.qkv.bias")) and shard_id is None:
            loaded.update((name, shard) for shard in QKVParallelLinear.SHARDS)
        else:
            loaded.add((name, shard_id))
    language_keys = model.language_model.load_weights(language_weights)
    loaded.update((LANGUAGE_PREFIX + name, shard_id) for name, shard_id in language_keys)
    if unexpected:
        raise CheckpointMismatchError(
            f"the checkpoint has {len(unexpected)} tensor(s) that {type(model).__name__} does not "
            f"use: {', '.join(sorted(unexpected)[:20])}"
        )
    return loaded
