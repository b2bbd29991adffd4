"""Triton kernels, each a thin wrapper next to the torch function it must agree with.

Nothing here is imported by `import ocula`: the layers import a kernel module only when they run
on a CUDA device, so a machine without Triton still runs every CPU path. On CPU the kernel tests
run the same kernels in Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

# Whether the kernels of a decode step's chain launch with programmatic dependent launch on GPUs
# that have it. A constant; the benchmark scripts' `--switches` set it before building the engine.
USE_PDL = True


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(tensor: torch.Tensor) -> bool:
    """True when `tensor` lives on a CUDA device and Triton can be imported: the fast path."""
    return tensor.is_cuda and triton_available()


def launch_with_pdl(tensor: torch.Tensor) -> bool:
    """Whether a kernel working on `tensor` launches with programmatic dependent launch (PDL):
    on a CUDA GPU of compute capability 9.0 or later (Hopper on) while `USE_PDL`.

    A kernel so launched may start while the kernel before it in the stream is still running, so
    its contract is: every program calls `gdc_wait()` (which returns once the previous grid has
    completed and its writes are visible) before it reads or writes anything another kernel
    writes. Only constants (weights) and the step's metadata may be loaded before it: tensors the
    host copies in before the step's first kernel (lengths, slot tables, positions), which no
    kernel of the step writes. Every such kernel waits, in every program (one that exits early
    waits first), so the ordering holds transitively along the stream. Kernels then call `gdc_launch_dependents()`,
    which lets the next launch begin early; its own wait still covers this kernel's writes.
    """
    return USE_PDL and tensor.is_cuda and _has_pdl(tensor.device.index)


@functools.cache
def _has_pdl(device_index: int | None) -> bool:
    # Not in Triton's interpreter (no inline PTX there, even for CUDA tensors).
    return os.environ.get("TRITON_INTERPRET") != "1" and hopper_or_later(device_index)


@functools.cache
def hopper_or_later(device_index: int | None) -> bool:
    """Whether CUDA device `device_index` is an NVIDIA GPU of compute capability 9.0 or later
    (programmatic dependent launch, the tensor memory accelerator); never on ROCm, whose
    capability numbers mean something else."""
    return torch.version.hip is None and torch.cuda.get_device_capability(device_index)[0] >= 9
