"""Random bf16 tensors for the benchmark checkpoints, and the safetensors shards they go into.

Each tensor is drawn on the device from its own seed (the run's seed and a hash of its name), so
its values do not depend on the order tensors are built in: matrices, embeddings and biases
~ N(0, 0.02) (small enough that bf16 activations stay finite through 28 layers), norm weights 1
and norm biases 0, ViT layer scales 0.1 (InternViT's initial value).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from benchmarks.checkpoint_layouts import LAYER_SCALE, TensorSpec

SHARD_BYTES = 2 << 30
WEIGHT_STD = 0.02
INDEX_FILE = "model.safetensors.index.json"


def _init_rule(name: str) -> str:
    if name.endswith(("lambda_1", "lambda_2", "ls1", "ls2")):
        return "layer_scale"
    if "norm" in name or name.startswith("mlp1.0."):  # mlp1.0 is the projector's LayerNorm
        return "zeros" if name.endswith("bias") else "ones"
    return "normal"


def random_tensor(
    name: str, shape: tuple[int, ...], device: torch.device, seed: int
) -> torch.Tensor:
    rule = _init_rule(name)
    dtype = torch.bfloat16
    if rule == "ones":
        return torch.ones(shape, dtype=dtype, device=device)
    if rule == "zeros":
        return torch.zeros(shape, dtype=dtype, device=device)
    if rule == "layer_scale":
        return torch.full(shape, LAYER_SCALE, dtype=dtype, device=device)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    values = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    return values.mul_(WEIGHT_STD).to(dtype)


class ShardWriter:
    """Collects tensors into ~SHARD_BYTES safetensors files, then writes the index."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        self.num_files = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.pending[name] = tensor
        self.pending_bytes += tensor.numel() * tensor.element_size()
        if self.pending_bytes >= SHARD_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        self.num_files += 1
        file_name = f"model-{self.num_files:05d}.safetensors"
        save_file(self.pending, str(self.out_dir / file_name), metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(self.pending, file_name))
        self.total_bytes += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        self._flush()
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": self.weight_map}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=1))


Rename = Callable[[str], "str | None"]


def write_tensors(
    specs: list[TensorSpec],
    outputs: list[tuple[ShardWriter, Rename]],
    device: torch.device,
    seed: int,
) -> int:
    """Draws every tensor once on `device` and hands it to each writer under its own name (a
    rename returning None leaves the tensor out of that checkpoint). Returns the bytes drawn."""
    total = 0
    for name, shape in specs:
        tensor = random_tensor(name, shape, device, seed).cpu()
        total += tensor.numel() * tensor.element_size()
        for writer, rename in outputs:
            target = rename(name)
            if target is not None:
                writer.add(target, tensor)
    for writer, _ in outputs:
        writer.close()
    return total
