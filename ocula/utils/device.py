"""Device and dtype selection, done once at start-up and passed down."""

from __future__ import annotations

import torch

_DTYPES = {
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def pick_device(requested: str) -> torch.device:
    """`auto` is the first CUDA device when there is one, else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device")
    return torch.device(requested)


def pick_dtype(
    requested: str, config_dtype: torch.dtype | None, device: torch.device
) -> torch.dtype:
    """An explicit --data_type wins. `auto` takes the checkpoint's dtype on GPU; on CPU it takes
    float32, the only dtype the CPU runs both fast and exactly."""
    if requested != "auto":
        return _DTYPES[requested]
    if device.type == "cpu":
        return torch.float32
    if config_dtype in (torch.float16, torch.bfloat16, torch.float32):
        return config_dtype
    return torch.bfloat16


def to_device_async(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor's copy on `device` without blocking the host: on CUDA it is staged in pinned
    memory first (a copy from pageable memory may wait for the device to finish its queued
    work, which would undo the overlap of scheduling with the GPU's previous step)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
