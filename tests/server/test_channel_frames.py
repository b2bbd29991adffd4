"""The engine channel's frames: a message's large arrays beside its pickle, decoded from any pieces."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from ocula.server.channel_frames import (
    HEADER,
    MAX_BUFFERS,
    OUT_OF_BAND_MIN_BYTES,
    FrameDecoder,
    decode,
    encode,
)


def tiles(count: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, 448, 448), dtype=torch.uint8, generator=generator)


def messages() -> list[object]:
    storage = torch.arange(300_000, dtype=torch.float32)
    return [
        {"tiles": tiles(2), "id": "a"},
        b"",
        "small text",
        {"small": torch.arange(10), "bf16": torch.ones(70_000, dtype=torch.bfloat16)},
        [storage[1000:100_000], storage.view(600, 500).t()],  # a view; a transposed view
        {"array": np.arange(50_000, dtype=np.int64), "empty": torch.zeros(0, 3)},
        {"grad": torch.ones(40_000, requires_grad=True)},
    ]


def same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and a.requires_grad == b.requires_grad
            and torch.equal(a.detach(), b.detach())
        )
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(same, a, b))
    return a == b


def test_frames_come_out_whole_whatever_pieces_the_bytes_arrive_in() -> None:
    sent = messages()
    stream = b"".join(b"".join(encode(message)) for message in sent)
    for piece in (1, 7, 4096, 1 << 20, len(stream)):
        if piece == 1:  # a byte at a time through a large stream: check a prefix of messages
            stream_part = b"".join(b"".join(encode(m)) for m in sent[1:4])
            expected, data = sent[1:4], stream_part
        else:
            expected, data = sent, stream
        decoder = FrameDecoder()
        out = []
        for start in range(0, len(data), piece):
            out += [decode(*frame) for frame in decoder.feed(data[start : start + piece])]
        assert same(out, expected)
        assert not decoder.mid_frame


def test_large_tensors_travel_beside_the_pickle_uncopied() -> None:
    image = tiles(1)
    header, data, *buffers = encode({"tiles": image})
    assert len(data) < 1000  # the pickle holds no pixels
    assert [buffer.nbytes for buffer in buffers] == [image.numel()]
    assert np.shares_memory(np.asarray(buffers[0]), image.numpy())  # the tensor's own memory
    decoded = decode(*FrameDecoder().feed(b"".join([header, data, *buffers]))[0])["tiles"]
    assert same(decoded, image)
    decoded[0, 0, 0, 0] += 1  # a writable tensor of its own
    # Small tensors stay in the pickle; a view sends only its elements.
    assert len(encode(torch.zeros(OUT_OF_BAND_MIN_BYTES // 4 - 1))) == 2
    storage = torch.zeros(1_000_000)
    assert sum(len(piece) for piece in encode(storage[:20_000])) < 100_000


def test_corrupt_lengths_are_errors_not_huge_allocations() -> None:
    with pytest.raises(ValueError, match="corrupt"):
        FrameDecoder().feed(HEADER.pack(1 << 62, 0))
    with pytest.raises(ValueError, match="corrupt"):
        FrameDecoder().feed(HEADER.pack(10, MAX_BUFFERS + 1))
    with pytest.raises(ValueError, match="corrupt"):
        FrameDecoder().feed(HEADER.pack(10, 1) + struct.pack("<Q", 1 << 62))


def test_a_queued_buffer_keeps_its_tensor_alive() -> None:
    # The channel may write a frame's buffers after the sender has dropped the message (the
    # front drops a request's tiles once sent): the views must keep the memory valid.
    import gc

    image = tiles(1, seed=3)
    expected = image.numpy().tobytes()
    pieces = encode({"tiles": image})
    del image
    gc.collect()
    reuse = [tiles(1, seed=4) for _ in range(8)]  # memory freed meanwhile would be reused here
    assert bytes(pieces[2]) == expected and len(reuse) == 8
