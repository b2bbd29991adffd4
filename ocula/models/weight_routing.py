"""Routing checkpoint tensors to model parameters by name.

A model declares `packed_modules_mapping`: checkpoint module name -> (module name in the model,
shard id). It renames modules (InternLM2 `wo` -> `o_proj`) and fuses them (Llama `q_proj` ->
shard "q" of `qkv_proj`). Names match whole dotted components, so "w1" never matches "w13".
Any other name must be a parameter of the model as it stands. Each parameter's own
`weight_loader` then copies its TP slice (the default copies the whole tensor).

Loaded pieces are tracked as (parameter name, shard id) keys, so a fused parameter is complete
only when every shard that maps onto it has arrived.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import nn

from ocula.layers.linear import CheckpointTensor, ShardId, load_replicated

WeightKey = tuple[str, ShardId]
PackedMapping = Mapping[str, tuple[str, ShardId]]

# Buffers some checkpoints save although they are derived, not learned.
DERIVED_BUFFER_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


class CheckpointMismatchError(ValueError):
    """The checkpoint has tensors the model does not, or lacks tensors the model needs."""


def route_name(name: str, mapping: PackedMapping) -> tuple[str, ShardId]:
    """Checkpoint tensor name -> (parameter name, shard id)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in mapping:
            target, shard_id = mapping[part]
            return ".".join([*parts[:i], target, *parts[i + 1 :]]), shard_id
    return name, None


def load_named_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, CheckpointTensor]],
    mapping: PackedMapping,
    ignored_names: frozenset[str] = frozenset(),
) -> set[WeightKey]:
    """Loads every tensor into its parameter; returns the keys loaded.

    Raises CheckpointMismatchError naming every tensor that has no parameter (after consuming
    all of `weights`, so the message lists them all at once).
    """
    params = dict(model.named_parameters())
    loaded: set[WeightKey] = set()
    unexpected: list[str] = []
    for name, tensor in weights:
        if name in ignored_names or name.endswith(DERIVED_BUFFER_SUFFIXES):
            continue
        param_name, shard_id = route_name(name, mapping)
        param = params.get(param_name)
        if param is None:
            unexpected.append(name)
            continue
        weight_loader = getattr(param, "weight_loader", load_replicated)
        weight_loader(param, tensor, shard_id)
        loaded.add((param_name, shard_id))
    if unexpected:
        raise CheckpointMismatchError(
            f"the checkpoint has {len(unexpected)} tensor(s) that {type(model).__name__} does not "
            f"use: {', '.join(sorted(unexpected)[:20])}"
        )
    return loaded


def expected_weight_keys(model: nn.Module, mapping: PackedMapping) -> set[WeightKey]:
    """Every (parameter, shard) the checkpoint must provide for `model` to be complete."""
    shards_of_module: dict[str, set[ShardId]] = {}
    for target, shard_id in mapping.values():
        shards_of_module.setdefault(target, set()).add(shard_id)
    expected: set[WeightKey] = set()
    for param_name, _ in model.named_parameters():
        module = param_name.split(".")[-2] if "." in param_name else ""
        for shard_id in shards_of_module.get(module, {None}):
            expected.add((param_name, shard_id))
    return expected


def check_complete(model: nn.Module, mapping: PackedMapping, loaded: set[WeightKey]) -> None:
    """Raises CheckpointMismatchError listing the parameters (and shards) never loaded."""
    missing = expected_weight_keys(model, mapping) - loaded
    if missing:
        described = sorted(
            name if shard is None else f"{name} [{shard}]" for name, shard in missing
        )
        raise CheckpointMismatchError(
            f"the checkpoint lacks {len(missing)} weight(s) of {type(model).__name__}: "
            f"{', '.join(described[:20])}"
        )
