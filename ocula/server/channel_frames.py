"""The engine channel's frames: a pickled message, with its large arrays beside the pickle.

A frame is a header, the pickle (protocol 5), then the raw bytes of each out-of-band buffer:
    "<QQ": the pickle's length and the number of buffers; one "<Q" length per buffer.
CPU tensors (of a dtype numpy has) and numpy arrays of at least OUT_OF_BAND_MIN_BYTES travel
out of band: the sender hands their memory to the socket as it is, never copied into a pickle,
and the receiver copies each once, into a buffer of its exact size that the unpickled array (or
tensor) then owns. A request's image tiles (602 KB each at 448 px) are such arrays. Pickled in
band, a tensor went through torch's own serialization and every frame through a growing buffer:
13 tiles (7.8 MB) took 35 ms from the front's send to the engine's message on the 2-core CPU
machine, most of it copies into fresh memory.

The decoder fills those exact-size buffers from whatever pieces the stream arrives in; it keeps
no buffer that grows with the stream.
"""

from __future__ import annotations

import io
import pickle
import struct
from typing import Any

import torch

HEADER = struct.Struct("<QQ")
LENGTH = struct.Struct("<Q")
# Smaller buffers stay inside the pickle: a separate part costs a header entry and a copy call.
OUT_OF_BAND_MIN_BYTES = 64 << 10
# A sanity bound on one frame (a request's images are bounded far below it by the body limit):
# a larger length means the stream is corrupt.
MAX_FRAME_BYTES = 1 << 34
MAX_BUFFERS = 1 << 16

# Tensors numpy can view without a copy (bfloat16 has no numpy dtype: torch pickles it).
_NUMPY_DTYPES = frozenset(
    (
        torch.bool,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.float16,
        torch.float32,
        torch.float64,
    )
)


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        # A plain CPU tensor as torch.from_numpy(its numpy view): numpy's pickling under
        # protocol 5 offers the data as an out-of-band buffer. The rebuilt tensor has the same
        # dtype, shape and values (contiguous strides, no autograd state).
        if (
            type(obj) is torch.Tensor
            and obj.device.type == "cpu"
            and obj.dtype in _NUMPY_DTYPES
            and not obj.requires_grad
            and not obj.is_conj()
            and not obj.is_neg()
        ):
            return torch.from_numpy, (obj.numpy(),)
        return NotImplemented


def encode(message: object) -> list[bytes | memoryview]:
    """A message's frame as pieces to write in order: header, pickle, out-of-band buffers (views
    of the message's own arrays, which must not change until written)."""
    buffers: list[memoryview] = []

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        raw = buffer.raw()
        if raw.nbytes < OUT_OF_BAND_MIN_BYTES:
            return True  # true: pickled in band
        buffers.append(raw)
        return False

    stream = io.BytesIO()
    _Pickler(stream, protocol=5, buffer_callback=out_of_band).dump(message)
    data = stream.getvalue()
    lengths = b"".join(LENGTH.pack(buffer.nbytes) for buffer in buffers)
    return [HEADER.pack(len(data), len(buffers)) + lengths, data, *buffers]


def decode(data: bytearray, buffers: list[bytearray]) -> Any:
    """The message of a frame that `FrameDecoder` completed."""
    return pickle.loads(data, buffers=buffers)


class FrameDecoder:
    """Splits a byte stream into frames, whatever the pieces it arrives in. Each frame's pickle
    and buffers are filled in place, in buffers of their final size."""

    def __init__(self) -> None:
        self._header = bytearray()
        self._parts: list[bytearray] | None = None  # the pickle, then the buffers
        self._part = 0  # the part being filled
        self._filled = 0  # bytes of it filled

    @property
    def mid_frame(self) -> bool:
        """A frame has begun and is not complete."""
        return bool(self._header) or self._parts is not None

    def feed(self, data: bytes | bytearray | memoryview) -> list[tuple[bytearray, list[bytearray]]]:
        """Adds bytes; returns the (pickle, buffers) of the frames they complete, in order (for
        `decode`). Raises ValueError on a corrupt stream."""
        view = memoryview(data).cast("B")
        frames = []
        while True:
            if self._parts is None:
                view = self._take_header(view)
                if self._parts is None:
                    return frames
            view = self._fill(view)
            if self._part < len(self._parts):
                return frames
            frames.append((self._parts[0], self._parts[1:]))
            self._parts = None

    def _take_header(self, view: memoryview) -> memoryview:
        """Moves header bytes from `view`; allocates the parts once the header is complete.
        Returns what is left of `view`."""
        header = self._header
        if len(header) < HEADER.size:
            take = min(HEADER.size - len(header), len(view))
            header += view[:take]
            view = view[take:]
            if len(header) < HEADER.size:
                return view
        length, count = HEADER.unpack_from(header)
        if count > MAX_BUFFERS:
            raise ValueError(f"a frame of {count} buffers: the stream is corrupt")
        needed = HEADER.size + LENGTH.size * count
        take = min(needed - len(header), len(view))
        header += view[:take]
        view = view[take:]
        if len(header) < needed:
            return view
        lengths = [length]
        lengths += [
            LENGTH.unpack_from(header, HEADER.size + LENGTH.size * i)[0] for i in range(count)
        ]
        if sum(lengths) > MAX_FRAME_BYTES:
            raise ValueError(f"a frame of {sum(lengths)} bytes: the stream is corrupt")
        self._parts = [bytearray(size) for size in lengths]
        self._part = self._filled = 0
        self._header = bytearray()
        return view

    def _fill(self, view: memoryview) -> memoryview:
        """Copies from `view` into the parts, in order; returns what is left of it."""
        parts = self._parts
        assert parts is not None
        while self._part < len(parts):
            target = parts[self._part]
            take = min(len(target) - self._filled, len(view))
            if take:
                target[self._filled : self._filled + take] = view[:take]
                self._filled += take
                view = view[take:]
            if self._filled < len(target):
                break
            self._part += 1
            self._filled = 0
        return view
