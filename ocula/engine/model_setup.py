"""Resolving what the engine args point at: the model folder, its configs, device and dtype.

Both sides of the engine do this (the front needs the tokenizer and generation defaults, the
core the config, device and dtype); it reads small JSON files only, never the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ocula.config import EngineArgs, resolve_chat_template
from ocula.models.hf_config import load_text_config, torch_dtype_of
from ocula.models.registry import supported_architecture
from ocula.utils.device import pick_device, pick_dtype
from ocula.utils.tokenizer import load_generation_config, load_tokenizer, resolve_eos_token_ids


@dataclass
class ModelSetup:
    model_dir: Path
    model_config: Any  # transformers.PretrainedConfig of the text model
    generation_config: dict[str, Any]
    device: torch.device
    dtype: torch.dtype

    def load_tokenizer(self, args: EngineArgs) -> Any:
        """The checkpoint's tokenizer, with --chat_template's template when given."""
        tokenizer = load_tokenizer(self.model_dir, args.tokenizer_mode, args.trust_remote_code)
        if args.chat_template is not None:
            tokenizer.chat_template = resolve_chat_template(args.chat_template)
        return tokenizer

    def eos_token_ids(self, args: EngineArgs, tokenizer: Any) -> frozenset[int]:
        return resolve_eos_token_ids(
            args.eos_id, self.generation_config, self.model_config, tokenizer
        )


def resolve_model(args: EngineArgs) -> ModelSetup:
    """Finds the model folder (converting the default model on first use) and reads its configs."""
    if args.model_dir is None:
        from ocula.default_model import default_model_dir

        model_dir = default_model_dir()
    else:
        model_dir = Path(args.model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"--model_dir {model_dir} does not exist or is not a folder")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: it is not a model folder")
    model_config = load_text_config(model_dir)
    supported_architecture(model_config)
    device = pick_device(args.device)
    dtype = pick_dtype(args.data_type, torch_dtype_of(model_config), device)
    return ModelSetup(model_dir, model_config, load_generation_config(model_dir), device, dtype)
