"""Every environment variable Ocula reads, read here and nowhere else."""

from __future__ import annotations

import os
from pathlib import Path


def _int_env(name: str, default: int | None) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"environment variable {name} must be at least 1, got {value}")
    return value


def load_workers() -> int:
    """LOADWORKER: threads that read checkpoint shards in parallel (default 1)."""
    return _int_env("LOADWORKER", 1) or 1


def internvl_image_length() -> int:
    """INTERNVL_IMAGE_LENGTH: image tokens per InternVL tile (default 256)."""
    return _int_env("INTERNVL_IMAGE_LENGTH", 256) or 256


def max_patch_num() -> int | None:
    """MAX_PATCH_NUM: cap on InternVL tiles per image when the request does not set one."""
    return _int_env("MAX_PATCH_NUM", None)


def cache_dir() -> Path:
    """Where converted default models live: OCULA_CACHE_DIR, else $XDG_CACHE_HOME/ocula."""
    explicit = os.environ.get("OCULA_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ocula"
