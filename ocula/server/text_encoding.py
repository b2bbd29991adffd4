"""Tokenizing in the front without stalling its event loop, or its memory.

The event loop serves every stream of the server; a 6,000-token prompt took ~10 ms to tokenize
on 2 CPU cores, a pause every other client would see. Long texts are tokenized in a worker
thread instead (the Rust tokenizer releases the GIL while it works); short ones inline, where a
thread hop would cost more than the work.

A huge text is first counted in chunks (`check_token_budget`): tokenized whole, a 40 MB prompt
took 17-29 s and 8.5 GB of the front's memory only to be refused for its length.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from ocula.server.request_errors import PromptTooLongError

# Texts from this many characters on are tokenized in a worker thread (~1,000 tokens, ~1.5 ms).
LONG_TEXT_CHARS = 4096
# Texts longer than this are counted in chunks of this many characters before being tokenized.
COUNT_CHUNK_CHARS = 1 << 18
# Tokens a cut between two chunks may add to their count, over what the whole text holds.
CHUNK_BOUNDARY_SLACK = 16

Result = TypeVar("Result")


async def off_loop_if_long(
    text: str, work: Callable[..., Result], *args: Any, **kwargs: Any
) -> Result:
    """`work(*args, **kwargs)`, in a worker thread when `text` (what it tokenizes) is long."""
    if len(text) < LONG_TEXT_CHARS:
        return work(*args, **kwargs)
    return await asyncio.to_thread(work, *args, **kwargs)


async def encode_text(
    tokenizer: Any, text: str, add_special_tokens: bool, max_tokens: int | None = None
) -> list[int]:
    """`tokenizer.encode(text)`, off the event loop when the text is long; with `max_tokens`,
    a huge text over that budget is refused first (`check_token_budget`)."""

    def work() -> list[int]:
        if max_tokens is not None:
            check_token_budget(tokenizer, text, max_tokens)
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)

    return await off_loop_if_long(text, work)


def check_token_budget(tokenizer: Any, text: str, max_tokens: int) -> None:
    """Raises PromptTooLongError (a RequestError) when `text` certainly holds more than
    `max_tokens` tokens. A text of over COUNT_CHUNK_CHARS characters is tokenized chunk by chunk
    (memory bounded by a chunk), stopping as soon as the count, less a slack for each cut, passes
    the budget; a shorter one, or one within it, is left to the caller's tokenizing and exact
    check."""
    if len(text) <= COUNT_CHUNK_CHARS:
        return
    counted = 0
    for index, start in enumerate(range(0, len(text), COUNT_CHUNK_CHARS)):
        chunk = text[start : start + COUNT_CHUNK_CHARS]
        counted += len(tokenizer.encode(chunk, add_special_tokens=False))
        # Each chunk so far ends at a cut (the last one too: the text goes on past it).
        if counted - CHUNK_BOUNDARY_SLACK * (index + 1) > max_tokens:
            raise PromptTooLongError(
                f"the prompt is over the limit of {max_tokens} tokens: its first "
                f"{start + len(chunk)} characters alone hold about {counted}"
            )


async def check_token_budget_off_loop(tokenizer: Any, text: str, max_tokens: int) -> None:
    """`check_token_budget` in a worker thread, where it has work to do."""
    if len(text) > COUNT_CHUNK_CHARS:
        await asyncio.to_thread(check_token_budget, tokenizer, text, max_tokens)
