"""The fixed inputs of the benchmarks, all derived from seeds (the same in every run and process).

- images: 448 x 448 RGB JPEGs (quality 90) of smooth random colour fields plus noise, distinct per
  seed; a 448 x 448 image is one InternVL tile (256 tokens), no thumbnail;
- text: words drawn from a fixed list of common English words (about one Qwen2 token each);
- prompts of token ids: uniform over ordinary BPE ids (no special or image tokens);
- arrivals: a Poisson process (exponential gaps) at a fixed rate.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

IMAGE_SIDE = 448
# Ordinary BPE ids of the Qwen2 vocabulary well clear of the added tokens (from 151643).
TOKEN_ID_RANGE = (1000, 150_000)
_WORD_TEXT = (
    "time year people way day man thing woman life child world school state family student "
    "group country problem hand part place case week company system program question work "
    "government number night point home water room mother area money story fact month lot "
    "right study book eye job word business issue side kind head house service friend father "
    "power hour game line end member law car city community name president team minute idea "
    "kid body information back parent face others level office door health person art war "
    "history party result change morning reason research girl guy moment air teacher force "
    "education picture colour light river mountain window garden table paper street music"
)
_WORDS = _WORD_TEXT.split()


def image_bytes(seed: int, side: int = IMAGE_SIDE) -> bytes:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((side, side), Image.BICUBIC), np.int16)
    noisy = np.clip(field + rng.integers(-24, 25, size=field.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noisy).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def words(seed: int, count: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(_WORDS[i] for i in rng.integers(0, len(_WORDS), size=count))


def chat_prompt(user_text: str) -> str:
    """One user turn in the checkpoints' ChatML template, ready for the assistant's answer."""
    return f"<|im_start|>user\n{user_text}<|im_end|>\n<|im_start|>assistant\n"


def image_prompt(seed: int, text_words: int) -> dict[str, Any]:
    """An offline multimodal prompt: one image, then `text_words` words of question."""
    question = words(seed, text_words)
    return {"prompt": chat_prompt(f"<image>\n{question}"), "images": [image_bytes(seed)]}


def token_prompts(seed: int, count: int, length: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    low, high = TOKEN_ID_RANGE
    return rng.integers(low, high, size=(count, length)).tolist()


def poisson_arrivals(seed: int, rate: float, count: int) -> list[float]:
    """Send times in seconds from the start, for `count` requests at `rate` per second."""
    rng = np.random.default_rng(seed)
    return np.cumsum(rng.exponential(1.0 / rate, size=count)).tolist()


@dataclass(frozen=True)
class OfflineWorkload:
    """A fixed offline workload: `requests` prompts, `new_tokens` outputs each, ignore_eos."""

    name: str
    requests: int
    new_tokens: int
    prompt_tokens: int  # text-only: tokens per prompt; multimodal: words of question text
    multimodal: bool

    def prompts(self, seed: int) -> list[Any]:
        if self.multimodal:
            return [image_prompt(seed + i, self.prompt_tokens) for i in range(self.requests)]
        return token_prompts(seed, self.requests, self.prompt_tokens)


# The workloads: 256 requests of one 448 x 448 image + ~64 text tokens, and the text-only
# twin of 320 prompt tokens; 256 output tokens each.
MULTIMODAL = OfflineWorkload("multimodal", 256, 256, 60, True)
TEXT_ONLY = OfflineWorkload("text_only", 256, 256, 320, False)
TINY_MULTIMODAL = OfflineWorkload("multimodal", 8, 16, 20, True)
TINY_TEXT_ONLY = OfflineWorkload("text_only", 8, 16, 48, False)
