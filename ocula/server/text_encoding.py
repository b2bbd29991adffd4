"""Tokenizing in the front without stalling its event loop.

The event loop serves every stream of the server; a 6,000-token prompt took ~10 ms to tokenize
on 2 CPU cores, a pause every other client would see. Long texts are tokenized in a worker
thread instead (the Rust tokenizer releases the GIL while it works); short ones inline, where a
thread hop would cost more than the work.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

# Texts from this many characters on are tokenized in a worker thread (~1,000 tokens, ~1.5 ms).
LONG_TEXT_CHARS = 4096

Result = TypeVar("Result")


async def off_loop_if_long(
    text: str, work: Callable[..., Result], *args: Any, **kwargs: Any
) -> Result:
    """`work(*args, **kwargs)`, in a worker thread when `text` (what it tokenizes) is long."""
    if len(text) < LONG_TEXT_CHARS:
        return work(*args, **kwargs)
    return await asyncio.to_thread(work, *args, **kwargs)


async def encode_text(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    """`tokenizer.encode(text)`, off the event loop when the text is long."""
    return await off_loop_if_long(
        text, tokenizer.encode, text, add_special_tokens=add_special_tokens
    )
