"""The front tiles each image it decodes and sends the tiles with the request, once: the same
tiles the engine makes from the bytes, none for an image it has seen before, and none kept
while the request runs."""

from __future__ import annotations

import asyncio
import base64
import pickle
from collections.abc import Iterator

import pytest
import torch

from ocula.multimodal.loaded_images import MAX_FRONT_TILES
from ocula.multimodal.preprocess_span import preprocess_span
from ocula.sampling.params import SamplingParams
from ocula.server.args import ServerArgs
from ocula.server.async_engine import AsyncEngine
from ocula.server.from_engine import EngineReady
from ocula.server.to_engine import AbortRequest, AddRequest
from tests.helpers.images import random_png
from tests.helpers.tiny_internvl import make_hf_internvl

PROMPT = "<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n"


class RecordingChannel:
    """Stands in for the engine's channel: keeps what the front sends, pickled as sent."""

    def __init__(self) -> None:
        self.sent: list[object] = []

    def send(self, message: object) -> None:
        self.sent.append(pickle.loads(pickle.dumps(message)))


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AsyncEngine]:
    checkpoint = make_hf_internvl(tmp_path_factory.mktemp("vlm"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INTERNVL_IMAGE_LENGTH", "4")  # the tiny checkpoint's 56 px tiles
        engine = AsyncEngine(ServerArgs(model_dir=str(checkpoint), enable_multimodal=True))
    engine.ready = EngineReady(kv_capacity=4096, max_req_total_len=2048, batch_max_tokens=2048)
    yield engine
    assert engine.images is not None
    asyncio.run(engine.images.close())


async def tokenize(front: AsyncEngine, picture: bytes, max_tiles: int | None = None) -> list:
    assert front.images is not None
    payload = {"type": "base64", "data": base64.b64encode(picture).decode()}
    _, spans = await front.images.tokenize(PROMPT, [payload], max_tiles, True)
    return spans


def test_a_decoded_image_carries_the_tiles_the_engine_would_make(front: AsyncEngine) -> None:
    picture = random_png(170, 56, 3)  # a 3 x 1 grid and a thumbnail
    (span,) = asyncio.run(tokenize(front, picture, max_tiles=6))
    assert span.pixel_values is not None and span.pixel_values.dtype == torch.uint8
    assert span.tiling.max_num == 6
    made_by_engine = preprocess_span(span)
    assert span.pixel_values.shape[0] == 4
    assert torch.equal(span.pixel_values, made_by_engine)
    assert span.length == span.pixel_values.shape[0] * 4
    # Seen before: not decoded, so no tiles (the engine tiles the bytes if its cache misses).
    (again,) = asyncio.run(tokenize(front, picture, max_tiles=6))
    assert again.pixel_values is None and again.key == span.key


def test_an_image_of_more_tiles_goes_as_bytes(front: AsyncEngine) -> None:
    # A request's own cap above the default: a 14 x 1 grid and a thumbnail.
    (span,) = asyncio.run(tokenize(front, random_png(14 * 20, 20, 5), max_tiles=16))
    assert span.length == (MAX_FRONT_TILES + 2) * 4
    assert span.pixel_values is None and span.image_bytes is not None
    # At the cap (a 12 x 1 grid and a thumbnail) the tiles come along.
    (span,) = asyncio.run(tokenize(front, random_png(12 * 20, 20, 6), max_tiles=16))
    assert span.pixel_values is not None and span.pixel_values.shape[0] == MAX_FRONT_TILES


def test_tiles_cross_to_the_engine_once_and_are_not_kept(front: AsyncEngine) -> None:
    channel = RecordingChannel()
    front._channel = channel  # type: ignore[assignment]
    spans = asyncio.run(tokenize(front, random_png(60, 60, 4)))
    tiles = spans[0].pixel_values
    assert tiles is not None
    prepared = front.prepare([1, 2, 3], SamplingParams(n=3, max_new_tokens=2), spans)

    async def send_then_leave() -> None:
        stream = front.generate("fan", prepared)
        reading = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0.05)  # the three sequences are sent; no engine answers
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)
        await stream.aclose()

    asyncio.run(send_then_leave())
    added = [m for m in channel.sent if isinstance(m, AddRequest)]
    assert len(added) == 3
    assert torch.equal(added[0].images[0].pixel_values, tiles)
    assert [m.images[0].pixel_values for m in added[1:]] == [None, None]
    assert all(m.images[0].key == spans[0].key for m in added)
    assert prepared.images[0].pixel_values is None  # the front holds the bytes only
    assert prepared.images[0].image_bytes is not None
    assert {m.request_id for m in channel.sent if isinstance(m, AbortRequest)} == {
        m.request_id for m in added
    }
