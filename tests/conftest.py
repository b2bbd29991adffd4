"""Fixtures shared by every test package: tiny checkpoints (built once per session), the real
Qwen2 tokenizer, and the converted default model (opt-in, see tests/helpers/default_model.py)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter. Triton reads this when a kernel is
# defined, so it must be set before any test module imports `ocula.kernels`.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    from tests.helpers import triton_interpreter

    triton_interpreter.install()

from tests.helpers.tiny_models import make_tiny_checkpoint

pytest_plugins = ["tests.helpers.qwen_tokenizer"]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """tiny_checkpoint(arch, **overrides) -> folder; identical requests share one folder."""
    built: dict[str, Path] = {}

    def build(arch: str, **overrides: Any) -> Path:
        key = json.dumps([arch, overrides], sort_keys=True)
        if key not in built:
            built[key] = make_tiny_checkpoint(arch, tmp_path_factory.mktemp(arch), **overrides)
        return built[key]

    return build
