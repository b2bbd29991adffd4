"""Building a model on its device and filling it from a safetensors checkpoint.

Checkpoints are one `model.safetensors` or several shards listed by
`model.safetensors.index.json`. Shard files are read by a pool of `num_workers` threads
(LOADWORKER); every tensor is handed to the model as a lazy safetensors slice, so each rank reads
from disk only the rows or columns its parameters hold. After all shards, every parameter (and
every shard of a fused one) must have been loaded.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm
from transformers import PretrainedConfig

from ocula import env
from ocula.distributed.parallel_group import SINGLE_RANK, ParallelGroup
from ocula.layers.attention import AttentionBackend
from ocula.layers.linear import CheckpointTensor
from ocula.models.registry import resolve_model_class
from ocula.models.weight_routing import WeightKey, check_complete

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Parameters created inside get `dtype`; the previous default is restored on exit.

    This is process-wide state, so models must not be built concurrently from several threads.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint, from its index when it is sharded."""
    model_dir = Path(model_dir)
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        with index_path.open(encoding="utf-8") as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        absent = [str(path) for path in files if not path.is_file()]
        if absent:
            raise FileNotFoundError(f"{INDEX_FILE} lists shard files that do not exist: {absent}")
        return files
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    raise FileNotFoundError(
        f"no {SINGLE_FILE} or {INDEX_FILE} in {model_dir}: only safetensors checkpoints are supported"
    )


def load_checkpoint(
    model: nn.Module,
    model_dir: str | Path,
    num_workers: int | None = None,
    show_progress: bool = True,
) -> None:
    """Fills `model` (which has `load_weights` and `packed_modules_mapping`) from `model_dir`.

    Raises CheckpointMismatchError for tensors the model lacks or weights the checkpoint lacks.
    """
    files = checkpoint_files(model_dir)
    workers = max(1, min(num_workers or env.load_workers(), len(files)))
    total = 0
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            total += len(f.keys())
    progress = tqdm(total=total, desc="Loading weights", unit="tensor", disable=not show_progress)
    progress_lock = threading.Lock()

    def load_file(path: Path) -> set[WeightKey]:
        with safe_open(str(path), framework="pt", device="cpu") as f:

            def lazy_tensors() -> Iterator[tuple[str, CheckpointTensor]]:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    yield name, f.get_slice(name)
                    with progress_lock:
                        progress.update(1)

            return model.load_weights(lazy_tensors())

    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ocula-load") as pool:
            loaded_per_file = list(pool.map(load_file, files))
    finally:
        progress.close()
    loaded: set[WeightKey] = set().union(*loaded_per_file)
    check_complete(model, model.packed_modules_mapping, loaded)


def load_model(
    model_dir: str | Path,
    config: PretrainedConfig,
    dtype: torch.dtype,
    device: torch.device | str,
    tp: ParallelGroup = SINGLE_RANK,
    num_workers: int | None = None,
    attention_backend: AttentionBackend | None = None,
    vision_tp: ParallelGroup | None = None,
) -> nn.Module:
    """Builds the model class registered for `config` directly on `device` in `dtype`, loads
    this rank's slices of the checkpoint, and returns it in eval mode.

    `num_workers` defaults to LOADWORKER (read at call time). The progress bar shows on rank 0.
    `vision_tp` (multimodal models only; default `tp`) is the group the vision encoder is
    sharded over.
    """
    model_class = resolve_model_class(config)
    extra = {"vision_tp": vision_tp} if vision_tp is not None and vision_tp is not tp else {}
    with torch.device(device), default_dtype(dtype):
        model = model_class(config, tp, attention_backend, **extra)
    load_checkpoint(model, model_dir, num_workers, show_progress=tp.rank == 0)
    return model.eval()
