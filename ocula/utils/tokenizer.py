"""Loading the tokenizer and the generation defaults that ship with a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def load_tokenizer(
    model_dir: Path, tokenizer_mode: str = "fast", trust_remote_code: bool = False
) -> Any:
    """The checkpoint's tokenizer; `slow` asks for the Python implementation. Raises
    ValueError for a folder without tokenizer files (transformers would build an empty
    tokenizer from config.json alone, and every prompt would tokenize to nothing)."""
    tokenizer = _load(model_dir, tokenizer_mode, trust_remote_code)
    if len(tokenizer) <= 1:
        raise ValueError(
            f"{model_dir} holds no usable tokenizer ({len(tokenizer)} token(s)): a model folder "
            "needs its tokenizer files (tokenizer.json, tokenizer.model, or vocab.json and "
            "merges.txt, with tokenizer_config.json)"
        )
    return tokenizer


def _load(model_dir: Path, tokenizer_mode: str, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    kwargs = {"trust_remote_code": trust_remote_code}
    if tokenizer_mode == "slow":
        return AutoTokenizer.from_pretrained(model_dir, use_fast=False, **kwargs)
    try:
        return AutoTokenizer.from_pretrained(model_dir, use_fast=True, **kwargs)
    except (ValueError, OSError):
        if tokenizer_mode != "auto":
            raise
        return AutoTokenizer.from_pretrained(model_dir, use_fast=False, **kwargs)


def load_generation_config(model_dir: Path) -> dict[str, Any]:
    """generation_config.json as a dict ({} when the checkpoint has none)."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def resolve_eos_token_ids(
    explicit: list[int] | None, generation_config: dict[str, Any], model_config: Any, tokenizer: Any
) -> frozenset[int]:
    """--eos_id, else generation_config.json, else config.json, else the tokenizer's eos."""
    for candidate in (
        explicit,
        generation_config.get("eos_token_id"),
        getattr(model_config, "eos_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
    ):
        if candidate is None:
            continue
        ids = [candidate] if isinstance(candidate, int) else list(candidate)
        if ids:
            return frozenset(int(i) for i in ids)
    return frozenset()
