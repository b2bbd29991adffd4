"""Device and dtype selection, done once at start-up and passed down."""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
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


def cat_to_device_async(parts: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """`torch.cat(parts)` (CPU tensors of one dtype) on `device`, as `to_device_async` but
    concatenated straight into one pinned buffer: one pinned allocation and one copy for all of
    them. A pinned block the caching host allocator cannot reuse (the device still reads the
    earlier ones) is a new page-locked allocation, ~0.75 ms of host time per 1 MB block on an
    H100 machine (it does not wait for the device's queued work). Staging 26 images of an
    offline step behind a busy device took 19.4 ms one by one and 11.0 ms in one buffer (1.7
    and 0.85 ms once the blocks were cached)."""
    if device.type != "cuda":
        return torch.cat(list(parts)).to(device)
    shape = (sum(part.shape[0] for part in parts), *parts[0].shape[1:])
    staged = torch.empty(shape, dtype=parts[0].dtype, pin_memory=True)
    torch.cat(list(parts), out=staged)
    return staged.to(device, non_blocking=True)


# Byte alignment of each array in `host_arrays_to_device`'s transfer: Triton specializes a
# pointer argument on whether it is 16-byte aligned, as a tensor of its own always is.
STAGING_ALIGNMENT = 16
_NUMPY_DTYPES = {torch.int64: np.int64, torch.int32: np.int32, torch.float32: np.float32}


def host_arrays_to_device(
    arrays: Sequence[tuple[Sequence[int] | Sequence[float], torch.dtype]], device: torch.device
) -> list[torch.Tensor]:
    """Each (values, dtype) as a 1-D tensor on `device`, all through one staging buffer and one
    transfer, without blocking the host (pinned staging on CUDA, as `to_device_async`). A
    step's batch has several small arrays; copied one by one, each paid a pinned allocation and
    a copy launch. The results are views of one buffer, each 16-byte aligned (int64, int32 and
    float32 values)."""
    offsets = []
    total = 0
    for values, dtype in arrays:
        offsets.append(total)
        size = len(values) * dtype.itemsize
        total += -(-size // STAGING_ALIGNMENT) * STAGING_ALIGNMENT
    host_bytes = np.empty(max(total, 1), dtype=np.uint8)
    for (values, dtype), offset in zip(arrays, offsets, strict=True):
        size = len(values) * dtype.itemsize
        host_bytes[offset : offset + size].view(_NUMPY_DTYPES[dtype])[:] = values
    staging = torch.from_numpy(host_bytes)
    moved = staging if device.type == "cpu" else to_device_async(staging, device)
    return [
        moved[offset : offset + len(values) * dtype.itemsize].view(dtype)
        for (values, dtype), offset in zip(arrays, offsets, strict=True)
    ]


# Host threads of torch's CPU operators in a process that drives a GPU. Its CPU work is small
# (scheduling, batch building, image tiling), where a pool's fork and join cost more than they
# save: with one thread the idle TTFT on an H200 host was ~1.5 ms lower (BENCHMARKS.md).
GPU_PROCESS_HOST_THREADS = 1


def set_host_threads(device: torch.device, ranks_on_node: int) -> None:
    """CPU ranks share the cores (each takes its share); a GPU rank takes one thread."""
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks_on_node))
    else:
        torch.set_num_threads(GPU_PROCESS_HOST_THREADS)


def copy_padded_(static: torch.Tensor, values: torch.Tensor | None, size: int, pad: float) -> None:
    """static[:n] = values and static[n:size] = pad, in place (n = len(values), 0 for None): how
    a CUDA graph's static input takes a batch smaller than the graph's."""
    count = 0 if values is None else values.shape[0]
    if count:
        static[:count].copy_(values)
    if count < size:
        static[count:size].fill_(pad)


def replay_once(graphs: Iterable[torch.cuda.CUDAGraph]) -> None:
    """Replays each freshly captured graph once, in order, then waits (collective where the
    graphs hold collectives: every rank passes the same graphs in the same order).

    A graph's first launch also uploads it to the device (torch does not expose cudaGraphUpload);
    on an H200 the first replay of the image prefill's whole-step graph took 15 ms of host time
    in the first request, the later ones ~0.6 ms. Right after capture every static input still
    holds its capture values (padding rows, the scratch slot, no request's KV), so these replays
    write nothing a request will read."""
    for graph in graphs:
        graph.replay()
    torch.cuda.synchronize()


@contextlib.contextmanager
def no_garbage_collection() -> Iterator[None]:
    """Collects garbage now, then keeps Python's collector off until the block ends: for CUDA
    graph captures. An automatic collection inside a capture can free another object's CUDA
    resources (an earlier engine's graphs, say), a call that invalidates the capture."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
