"""Host-side helpers of the Gluon kernels written for Hopper (`pingpong_linear`): whether a
device is one, the shared-memory layouts of their tensor descriptors, the SM count their
persistent grids take."""

from __future__ import annotations

import functools

import torch
from triton.experimental.gluon import language as gl

from ocula.kernels import hopper_or_later


@functools.cache
def is_hopper(device_index: int | None) -> bool:
    """Compute capability 9.x: wgmma is sm_90's; later GPUs have other tensor-core instructions."""
    return hopper_or_later(device_index) and torch.cuda.get_device_capability(device_index)[0] == 9


@functools.cache
def nvmma_layout(block: tuple[int, int], dtype: torch.dtype) -> gl.NVMMASharedLayout:
    """The default shared-memory layout of a 16-bit [rows, columns] TMA block; built once per
    shape, since the kernels' launches are host-bound at small batches."""
    element = gl.bfloat16 if dtype == torch.bfloat16 else gl.float16
    return gl.NVMMASharedLayout.get_default_for(list(block), element)


@functools.cache
def sm_count(device_index: int | None) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count
