"""Long texts are tokenized off the front's event loop, short ones inline; same ids either way.
Huge texts over the token budget are refused after a few chunks, never tokenized whole."""

from __future__ import annotations

import asyncio
import threading

import pytest

from ocula.server.request_errors import RequestError
from ocula.server.text_encoding import (
    COUNT_CHUNK_CHARS,
    LONG_TEXT_CHARS,
    check_token_budget,
    encode_text,
)


class RecordingTokenizer:
    def __init__(self) -> None:
        self.threads: list[str] = []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.threads.append(threading.current_thread().name)
        return ([1] if add_special_tokens else []) + [ord(c) for c in text]


def test_long_texts_are_tokenized_in_a_worker_thread() -> None:
    tokenizer = RecordingTokenizer()
    short, long = "hi there", "x" * LONG_TEXT_CHARS

    async def both() -> list[list[int]]:
        return [
            await encode_text(tokenizer, short, add_special_tokens=True),
            await encode_text(tokenizer, long, add_special_tokens=False),
        ]

    ids = asyncio.run(both())
    assert ids == [tokenizer.encode(short, True), tokenizer.encode(long, False)]
    main = threading.main_thread().name
    assert tokenizer.threads[0] == main and tokenizer.threads[1] != main


class CountingTokenizer:
    """One token per word (and per run of spaces); records the length of every text it encodes."""

    def __init__(self) -> None:
        self.encoded: list[int] = []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.encoded.append(len(text))
        return [1] * len(text.split()) + ([0] if add_special_tokens else [])


def test_a_huge_text_over_the_budget_is_refused_from_its_first_chunks() -> None:
    tokenizer = CountingTokenizer()
    huge = "word " * (4 * COUNT_CHUNK_CHARS)  # 20 chunks of ~52k words each
    with pytest.raises(RequestError, match="over the limit of 60000 tokens"):
        check_token_budget(tokenizer, huge, 60_000)
    # Two chunks proved it; nothing near the whole text was tokenized at once.
    assert tokenizer.encoded == [COUNT_CHUNK_CHARS, COUNT_CHUNK_CHARS]
    with pytest.raises(RequestError, match="over the limit"):
        asyncio.run(encode_text(tokenizer, huge, True, max_tokens=60_000))


def test_texts_within_the_budget_or_short_are_left_to_the_exact_check() -> None:
    tokenizer = CountingTokenizer()
    words = COUNT_CHUNK_CHARS // 5 * 3  # 3 chunks
    within = "word " * words
    check_token_budget(tokenizer, within, words)  # at the budget exactly: not refused
    # Each cut may add tokens (a word split in two): the slack keeps a text at the budget in.
    split_words = "abcdefg " * (COUNT_CHUNK_CHARS // 8 * 2) + "x"
    check_token_budget(tokenizer, split_words, len(split_words.split()))
    tokenizer.encoded.clear()
    short = "word " * (COUNT_CHUNK_CHARS // 5)  # one chunk at most: never counted here
    check_token_budget(tokenizer, short, 10)
    assert tokenizer.encoded == []
    ids = asyncio.run(encode_text(tokenizer, within, False, max_tokens=words))
    assert len(ids) == words
