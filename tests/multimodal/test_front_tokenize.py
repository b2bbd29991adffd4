"""The front's prompt with images (`FrontImages.tokenize`): the text is tokenized while a new
image decodes in its worker thread, and the result is the one `build_image_prompt` gives."""

from __future__ import annotations

import asyncio
import base64
import io
import threading

import pytest
from PIL import Image
from transformers import AutoTokenizer

from ocula.multimodal import loaded_images
from ocula.multimodal.internvl_prompt import build_image_prompt
from ocula.multimodal.loaded_images import LoadedImage
from ocula.server.images import FrontImages
from tests.multimodal.test_internvl_prompt import IMAGE_TOKENS, spec_for

TEXT = "Look at this: <image>\nWhat is in it?"


@pytest.fixture(scope="module")
def tokenizer(qwen_tokenizer_dir):
    copy = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    copy.add_tokens(IMAGE_TOKENS, special_tokens=True)
    return copy


def jpeg(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 90)).save(buffer, format="JPEG")
    return buffer.getvalue()


class SignallingTokenizer:
    """The tokenizer, setting `encoded` once it has tokenized something."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.encoded = threading.Event()

    def encode(self, *args, **kwargs):
        ids = self.tokenizer.encode(*args, **kwargs)
        self.encoded.set()
        return ids


def test_the_text_is_tokenized_while_a_new_image_decodes(tokenizer, monkeypatch) -> None:
    """The decoding thread waits until the tokenizer has run: done one after the other (the
    image first), the request would time out here."""
    signalling = SignallingTokenizer(tokenizer)
    spec = spec_for(tokenizer)
    waited = []
    real_decode = loaded_images.decode_image

    def decode_after_the_tokenizer(*args):
        waited.append(signalling.encoded.wait(10))
        return real_decode(*args)

    monkeypatch.setattr(loaded_images, "decode_image", decode_after_the_tokenizer)
    picture = jpeg(1000, 300)
    source = {"type": "base64", "data": base64.b64encode(picture).decode()}

    async def main() -> tuple[list[int], list]:
        front = FrontImages(spec, signalling, allow_local_media=False)
        try:
            return await asyncio.wait_for(front.tokenize(TEXT, [source], None, True), 5)
        finally:
            await front.close()

    ids, spans = asyncio.run(main())
    assert waited == [True]
    expected_ids, expected_spans = build_image_prompt(
        TEXT, [LoadedImage(picture, spans[0].key.split(":")[0], (1000, 300))], spec, tokenizer
    )
    assert ids == expected_ids
    assert [(s.key, s.offset, s.length) for s in spans] == [
        (s.key, s.offset, s.length) for s in expected_spans
    ]
    # The front tiled the image with the request's tiling, in the decoding thread.
    assert spans[0].pixel_values is not None and spans[0].pixel_values.shape[1:] == (3, 448, 448)


def test_a_refused_text_cancels_the_image_loads(tokenizer, monkeypatch) -> None:
    """Placeholder tokens in the text: a 400 (ValueError) while the image still decodes, whose
    load is cancelled rather than left running."""
    spec = spec_for(tokenizer)
    release = threading.Event()
    real_decode = loaded_images.decode_image
    cancelled = []
    real_load = loaded_images.load_image

    def slow_decode(*args):
        release.wait(10)
        return real_decode(*args)

    async def watched_load(*args):
        try:
            return await real_load(*args)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    monkeypatch.setattr(loaded_images, "decode_image", slow_decode)
    monkeypatch.setattr("ocula.server.images.load_image", watched_load)
    source = {"type": "base64", "data": base64.b64encode(jpeg(64, 64)).decode()}

    async def main() -> None:
        front = FrontImages(spec, tokenizer, allow_local_media=False)
        try:
            await front.tokenize("<image> and <IMG_CONTEXT>", [source], None, True)
        finally:
            release.set()
            await front.close()

    with pytest.raises(ValueError, match="placeholder tokens of its own"):
        asyncio.run(main())
    assert cancelled == [True]
