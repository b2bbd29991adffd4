"""Triton kernels, each a thin wrapper next to the torch function it must agree with.

Nothing here is imported by `import ocula`: the layers import a kernel module only when they run
on a CUDA device, so a machine without Triton still runs every CPU path. On CPU the kernel tests
run the same kernels in Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py).
"""

from __future__ import annotations

import importlib.util

import torch


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(tensor: torch.Tensor) -> bool:
    """True when `tensor` lives on a CUDA device and Triton can be imported: the fast path."""
    return tensor.is_cuda and triton_available()
