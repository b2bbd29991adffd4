"""Long texts are tokenized off the front's event loop, short ones inline; same ids either way."""

from __future__ import annotations

import asyncio
import threading

from ocula.server.text_encoding import LONG_TEXT_CHARS, encode_text


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
