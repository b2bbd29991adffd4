"""A CUDA graph's static inputs laid out in one device block, filled by one host-to-device copy.

A graph replays on fixed device addresses, so each step's values must be copied into its static
input tensors first. Built as a `ForwardBatch` and then copied one tensor at a time (the step's
values plus a fill of the padding rows for each, ~10 small operations), a single-sequence step's
inputs took ~0.26 ms of host time on an H100 host while the idle GPU waited for them. Here every
input is a view of one block: the host writes the step's values, padded, into a pinned copy of
the whole block, and one asynchronous copy moves it (a few KiB). Values the graph derives from
its inputs (a token's KV slot from the slot table) are computed inside the graph instead of
before it. The pinned copies are the block's own, used in turn, so a step allocates nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

# Each field starts 16-byte aligned, as a tensor of its own would: Triton specializes a pointer
# argument on that alignment.
FIELD_ALIGNMENT = 16
_NUMPY_DTYPES = {torch.int64: np.int64, torch.int32: np.int32}
# Pinned host copies of a block, written in turn. One may be rewritten only once the transfer
# queued from it has run (its event); with the engine's one step in flight, the copy two steps
# back has long run by then, so the wait costs nothing.
STAGING_BUFFERS = 2


@dataclass(frozen=True)
class InputField:
    """`length` values of `dtype` whose entries no step sets hold `pad`."""

    name: str
    length: int
    dtype: torch.dtype
    pad: int = 0


class StaticInputBlock:
    """The fields' device views (`view`) at fixed addresses, and `stage` to refill them all."""

    def __init__(self, fields: Sequence[InputField], device: torch.device) -> None:
        self.device = device
        self._fields = {field.name: field for field in fields}
        self._offsets: dict[str, int] = {}
        total = 0
        for field in fields:
            if field.dtype not in _NUMPY_DTYPES:
                raise ValueError(
                    f"{field.name}: static inputs hold int64 or int32, not {field.dtype}"
                )
            self._offsets[field.name] = total
            size = field.length * field.dtype.itemsize
            total += -(-size // FIELD_ALIGNMENT) * FIELD_ALIGNMENT
        # Every field at its padding: each step's host copy starts from this.
        self._template = np.zeros(max(total, FIELD_ALIGNMENT), dtype=np.uint8)
        for field in fields:
            self._host_view(self._template, field.name)[:] = field.pad
        self.block = torch.from_numpy(self._template.copy()).to(device)
        self._staging: list[tuple[torch.Tensor, np.ndarray, torch.cuda.Event]] = []
        if device.type == "cuda":
            for _ in range(STAGING_BUFFERS):
                pinned = torch.empty(self._template.size, dtype=torch.uint8, pin_memory=True)
                self._staging.append((pinned, pinned.numpy(), torch.cuda.Event()))
        self._next_staging = 0

    def _host_view(self, host: np.ndarray, name: str) -> np.ndarray:
        field = self._fields[name]
        offset = self._offsets[name]
        size = field.length * field.dtype.itemsize
        return host[offset : offset + size].view(_NUMPY_DTYPES[field.dtype])

    def view(self, name: str) -> torch.Tensor:
        """The field's device tensor [length] (a view of the block: its address never changes)."""
        field = self._fields[name]
        offset = self._offsets[name]
        size = field.length * field.dtype.itemsize
        return self.block[offset : offset + size].view(field.dtype)

    def host_values(self, values: Mapping[str, Sequence[int] | np.ndarray]) -> np.ndarray:
        """The block's bytes for one step: each named field starts with its values (at most its
        length), the rest of it and every field not named hold their padding."""
        host = self._template.copy()
        self._write_values(host, values)
        return host

    def _write_values(
        self, host: np.ndarray, values: Mapping[str, Sequence[int] | np.ndarray]
    ) -> None:
        for name, field_values in values.items():
            count = len(field_values)
            length = self._fields[name].length
            if count > length:
                raise ValueError(f"{count} values for the {length} of static input {name!r}")
            self._host_view(host, name)[:count] = field_values

    def stage(self, values: Mapping[str, Sequence[int] | np.ndarray]) -> None:
        """Writes `host_values(values)` into the block, queued on the current stream without
        blocking the host on CUDA (through the next of the block's pinned copies)."""
        if not self._staging:
            self.block.copy_(torch.from_numpy(self.host_values(values)))
            return
        pinned, host, copied = self._staging[self._next_staging]
        copied.synchronize()  # the transfer last queued from this copy; at once if none was
        np.copyto(host, self._template)
        self._write_values(host, values)
        self.block.copy_(pinned, non_blocking=True)
        copied.record()
        self._next_staging = (self._next_staging + 1) % len(self._staging)
