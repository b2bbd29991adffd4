"""`load_image`: an image reference to bytes, MD5 and size, and the front's memory of images it has
seen (`KnownImageSizes`): what it lets the front skip, and what it must not."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import threading

import numpy as np
import pytest
from PIL import Image

from ocula.multimodal.image_fetching import make_http_client
from ocula.multimodal.image_loading import ImageLimits, ImageSource, md5_hex
from ocula.multimodal.loaded_images import KnownImageSizes, load_image
from tests.helpers.image_loading import LIMITS, encode, gradient, status_of


def run_load_image(raw: dict):
    async def load():
        async with make_http_client() as client:
            return await load_image(ImageSource.parse(raw), LIMITS, client)

    return asyncio.run(load())


def test_load_image_returns_bytes_md5_and_rgb():
    data = encode(gradient(), "PNG")
    loaded = run_load_image({"type": "base64", "data": base64.b64encode(data).decode()})
    assert loaded.data == data
    assert loaded.md5 == md5_hex(data) == hashlib.md5(data).hexdigest()
    assert loaded.size == (24, 16)
    not_an_image = {"type": "base64", "data": base64.b64encode(b"plain text").decode()}
    assert status_of(run_load_image, not_an_image) == 400


async def run_known(payload: str, known: KnownImageSizes):
    async with make_http_client() as client:
        source = ImageSource.parse({"type": "base64", "data": payload})
        return await load_image(source, LIMITS, client, known)


def test_an_image_seen_before_is_not_decoded_again(monkeypatch: pytest.MonkeyPatch):
    from ocula.multimodal import loaded_images

    decoded: list[int] = []
    real_decode = loaded_images.decode_image

    def counting_decode(data: bytes, limits: ImageLimits):
        decoded.append(len(data))
        return real_decode(data, limits)

    monkeypatch.setattr(loaded_images, "decode_image", counting_decode)
    known = KnownImageSizes(capacity=2)
    pictures = [encode(gradient(), "PNG"), encode(gradient(), "BMP"), encode(gradient(), "GIF")]

    async def load_all(datas: list[bytes]) -> list:
        async with make_http_client() as client:
            return [
                await load_image(
                    ImageSource.parse({"type": "base64", "data": base64.b64encode(d).decode()}),
                    LIMITS,
                    client,
                    known,
                )
                for d in datas
            ]

    first = asyncio.run(load_all(pictures[:2]))
    again = asyncio.run(load_all(pictures[:2]))
    # The same payloads: neither decoded nor even base64-decoded again; the payload stands in
    # for the bytes (the engine decodes it on a cache miss).
    assert len(decoded) == 2
    assert [(i.md5, i.size) for i in again] == [(i.md5, i.size) for i in first]
    for image, seen in zip(again, first, strict=True):
        assert image.data is None and base64.b64decode(image.base64) == seen.data
    assert all(image.size == (24, 16) for image in again)
    asyncio.run(load_all(pictures[2:]))  # a third image evicts the least recently used
    assert len(known) == 2 and known.get(hashlib.sha256(pictures[0]).hexdigest()) is None
    asyncio.run(load_all(pictures[:1]))
    assert len(decoded) == 4
    # The same bytes in another payload (no '=' padding): base64-decoded, not decoded again.
    unpadded = base64.b64encode(pictures[0]).decode().rstrip("=")
    assert unpadded != base64.b64encode(pictures[0]).decode()
    other = asyncio.run(run_known(unpadded, known))
    assert len(decoded) == 4 and (other.data, other.md5) == (pictures[0], first[0].md5)
    # Bytes that failed to decode are not remembered: they fail again, with the same status.
    bad = {"type": "base64", "data": base64.b64encode(b"plain text").decode()}
    for _ in range(2):
        assert status_of(lambda: asyncio.run(load_all([b"plain text"]))) == 400
    assert status_of(run_load_image, bad) == 400


def test_a_forged_md5_twin_of_a_known_image_is_still_decoded(monkeypatch: pytest.MonkeyPatch):
    """The caches key images by MD5, whose collisions can be forged: the front's memory of
    sizes must not let a twin's bytes skip their check."""
    from ocula.multimodal import loaded_images
    from ocula.multimodal.image_processing import InternVLImageConfig
    from ocula.multimodal.internvl_prompt import image_cache_key

    monkeypatch.setattr(loaded_images, "md5_hex", lambda data: "same-md5-for-every-input")
    known = KnownImageSizes()

    async def load(data: bytes):
        async with make_http_client() as client:
            source = ImageSource.parse({"type": "base64", "data": base64.b64encode(data).decode()})
            return await load_image(source, LIMITS, client, known)

    small = asyncio.run(load(encode(gradient(), "PNG")))
    assert status_of(lambda: asyncio.run(load(b"\x89PNG\r\n\x1a\n not really"))) == 400
    large = asyncio.run(load(encode(gradient(48, 16), "PNG")))
    assert small.md5 == large.md5 and small.size != large.size
    # Same MD5, different sizes: different embedding-cache keys, so different span lengths
    # never share an embedding.
    tiling = InternVLImageConfig()
    assert image_cache_key(small.md5, small.size, tiling) != image_cache_key(
        large.md5, large.size, tiling
    )


def test_large_payloads_are_decoded_and_hashed_off_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
):
    from ocula.multimodal import image_fetching, loaded_images

    threads: dict[str, list[str]] = {"base64": [], "digests": []}
    for name, key in (("decode_base64", "base64"), ("_digests", "digests")):
        real = getattr(loaded_images, name)

        def recording(*args, real=real, key=key):
            threads[key].append(threading.current_thread().name)
            return real(*args)

        monkeypatch.setattr(loaded_images, name, recording)
        if name == "decode_base64":  # small payloads decode through fetch_image_bytes
            monkeypatch.setattr(image_fetching, name, recording)
    noise = np.random.default_rng(0).integers(0, 256, (800, 800, 3), dtype=np.uint8)
    large = encode(Image.fromarray(noise), "PNG")
    assert len(large) > loaded_images.INLINE_WORK_BYTES
    small = encode(gradient(), "PNG")
    loaded = [
        run_load_image({"type": "base64", "data": base64.b64encode(data).decode()})
        for data in (large, small)
    ]
    assert [image.size for image in loaded] == [(800, 800), (24, 16)]
    assert loaded[0].md5 == md5_hex(large)
    main = threading.main_thread().name
    assert threads["base64"][0] != main and threads["digests"][0] != main
    assert threads["base64"][1] == threads["digests"][1] == main  # small: inline


def test_a_payload_seen_before_reaches_the_engine_as_base64_and_tiles_the_same():
    import torch

    from ocula.engine.request import ImageSpan
    from ocula.multimodal.image_processing import InternVLImageConfig
    from ocula.multimodal.preprocess_span import preprocess_span

    known = KnownImageSizes()
    payload = base64.b64encode(encode(gradient(), "PNG")).decode()
    first = asyncio.run(run_known(payload, known))
    # Wrapped at 76 columns (MIME style): the same payload once the whitespace is gone.
    wrapped = "\n".join(payload[i : i + 76] for i in range(0, len(payload), 76))
    again = asyncio.run(run_known(wrapped, known))
    assert first.data is not None and again.data is None and again.base64 == payload
    tiling = InternVLImageConfig(image_size=8, max_num=6)
    tiles = [
        preprocess_span(ImageSpan("k", 0, 1, i.data, tiling=tiling, image_base64=i.base64))
        for i in (first, again)
    ]
    assert tiles[0].shape[0] > 1 and torch.equal(tiles[0], tiles[1])
