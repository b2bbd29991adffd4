"""Image tags expanded to placeholder spans: the ids equal tokenizing the fully expanded text.

`build_image_prompt` tokenizes one placeholder per image and repeats its id afterwards; the
oracle here is what the reference does, writing every placeholder into the text and tokenizing
it all. Checked with the real Qwen2 vocabulary (InternVL's image tokens added as InternVL's
tokenizer has them) on prompts with text glued to the tags, several images, chat markup and
both values of add_special_tokens.
"""

from __future__ import annotations

import re

import pytest
from transformers import AutoTokenizer

from ocula.multimodal.image_processing import InternVLImageConfig, count_tiles
from ocula.multimodal.internvl_prompt import VisionSpec, build_image_prompt
from ocula.multimodal.loaded_images import LoadedImage

IMAGE_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>"]
TOKENS_PER_TILE = 256
PROMPTS = [
    "<image>\nWhat is in the picture?",
    "Compare<img></img>and <image> please.",
    "<|im_start|>user\nLook: <image>\n描述一下这张图片。<|im_end|>\n<|im_start|>assistant\n",
    "no space<image>glued   \n\n<img></img>\t trailing <image>",
    "<image><image>",
]
SIZES = [(448, 448), (1000, 300), (40, 900), (2000, 1500), (64, 64)]


@pytest.fixture(scope="module")
def tokenizer(qwen_tokenizer_dir):
    """A copy of the session's Qwen2 tokenizer (not the shared one) with the image tokens."""
    copy = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    copy.add_tokens(IMAGE_TOKENS, special_tokens=True)
    return copy


def spec_for(tokenizer) -> VisionSpec:
    return VisionSpec(
        InternVLImageConfig(),
        TOKENS_PER_TILE,
        tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        "<img>",
        "</img>",
        "<IMG_CONTEXT>",
    )


def fully_expanded_ids(text: str, sizes: list, tokenizer, add_special_tokens: bool) -> list[int]:
    counts = iter(count_tiles(*size, InternVLImageConfig()) * TOKENS_PER_TILE for size in sizes)
    expanded = re.sub(
        r"<img></img>|<image>", lambda _: "<img>" + "<IMG_CONTEXT>" * next(counts) + "</img>", text
    )
    return tokenizer.encode(expanded, add_special_tokens=add_special_tokens)


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_ids_and_spans_equal_the_fully_expanded_prompt(tokenizer, add_special_tokens) -> None:
    spec = spec_for(tokenizer)
    for index, text in enumerate(PROMPTS):
        tags = len(re.findall(r"<img></img>|<image>", text))
        sizes = [SIZES[(index + i) % len(SIZES)] for i in range(tags)]
        images = [LoadedImage(b"", f"md5-{i}", size) for i, size in enumerate(sizes)]
        ids, spans = build_image_prompt(
            text, images, spec, tokenizer, add_special_tokens=add_special_tokens
        )
        assert ids == fully_expanded_ids(text, sizes, tokenizer, add_special_tokens), text
        context = spec.context_token_id
        for span, size in zip(spans, sizes, strict=True):
            assert span.length == count_tiles(*size, InternVLImageConfig()) * TOKENS_PER_TILE
            assert ids[span.offset : span.offset + span.length] == [context] * span.length
            assert ids[span.offset - 1] != context and ids[span.offset + span.length] != context
        assert ids.count(context) == sum(span.length for span in spans)


def test_placeholder_tokens_in_the_text_are_refused(tokenizer) -> None:
    spec = spec_for(tokenizer)
    image = LoadedImage(b"", "md5", (448, 448))
    for text in ["<image> and <IMG_CONTEXT>", "<image><IMG_CONTEXT>", "<IMG_CONTEXT><image>"]:
        with pytest.raises(ValueError, match="placeholder tokens of its own"):
            build_image_prompt(text, [image], spec, tokenizer)


def test_image_tags_beyond_the_images_stay_text_without_img_pairs(tokenizer) -> None:
    """InternVL's chat and LightLLM replace the first <image> tags, one per image, and leave
    the others as text; with an <img></img> pair among the tags, LightLLM counts them all, so
    a mismatch is refused."""
    spec = spec_for(tokenizer)
    image = LoadedImage(b"", "md5", (448, 448))
    text = "<image>\nWhat does the tag <image> mean here?"
    ids, spans = build_image_prompt(text, [image], spec, tokenizer)
    reference = fully_expanded_ids("<image>", [(448, 448)], tokenizer, True)
    tail = tokenizer.encode("\nWhat does the tag <image> mean here?", add_special_tokens=False)
    assert ids == reference + tail and len(spans) == 1
    for mismatched in ["<img></img> and <image>", "<image><img></img>", "no tag at all"]:
        with pytest.raises(ValueError, match="must match one to one"):
            build_image_prompt(mismatched, [image], spec, tokenizer)
