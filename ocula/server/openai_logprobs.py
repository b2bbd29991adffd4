"""Tokens as OpenAI's logprobs show them: each token's text and exact bytes, and the
alternatives of an event, most likely first; and vLLM's `prompt_logprobs`."""

from __future__ import annotations

import functools
import re
from typing import Any

from tokenizers import decoders

from ocula.engine.outputs import TokenLogprob
from ocula.server.protocol_openai import CompletionLogprobs, PromptLogprob, TopLogprob

# JSON has no -inf; OpenAI reports impossible tokens with this logprob, and so do we.
MIN_LOGPROB = -9999.0


def token_text(tokenizer: Any, token_id: int) -> str:
    """The text of one token alone, special tokens included. A token holding only part of a UTF-8
    character decodes to U+FFFD; `token_bytes` has its real bytes."""
    return tokenizer.decode([token_id], skip_special_tokens=False)


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's reversible map from the printable character standing for a byte to the
    byte: printable Latin-1 bytes stand for themselves, the others for U+0100 onwards, in order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    alphabet = {chr(byte): byte for byte in printable}
    others = [byte for byte in range(256) if byte not in alphabet.values()]
    alphabet.update({chr(0x100 + i): byte for i, byte in enumerate(others)})
    return alphabet


def token_bytes(tokenizer: Any, token_id: int, text: str) -> list[int]:
    """The UTF-8 bytes a token stands for, exact for byte-level BPE (GPT-2, Llama 3, Qwen) and
    SentencePiece byte-fallback (`<0xE4>`) tokens; otherwise the bytes of its decoded `text`."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(piece, str):
        match = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
        if match:
            return [int(match.group(1), 16)]
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        alphabet = _byte_level_alphabet()
        if isinstance(decoder, decoders.ByteLevel) and all(c in alphabet for c in piece):
            return [alphabet[c] for c in piece]
    return list(text.encode())


def clamp_logprob(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


def top_logprob(tokenizer: Any, token_id: int, logprob: float) -> TopLogprob:
    text = token_text(tokenizer, token_id)
    return TopLogprob(
        token=text,
        logprob=clamp_logprob(logprob),
        bytes=token_bytes(tokenizer, token_id, text),
    )


def top_alternatives(
    tokenizer: Any, alternatives: list[tuple[int, float]] | None
) -> list[TopLogprob]:
    """(token id, logprob) alternatives as OpenAI shows them, most likely first."""
    ranked = sorted(alternatives or [], key=lambda pair: pair[1], reverse=True)
    return [top_logprob(tokenizer, token_id, logprob) for token_id, logprob in ranked]


def vllm_prompt_logprobs(
    tokenizer: Any, entries: list[TokenLogprob | None] | None, k: int
) -> list[dict[str, PromptLogprob] | None] | None:
    """vLLM's `prompt_logprobs` of the engine's entries: per position the prompt token (with its
    rank) and its `k` likeliest alternatives (ranked 1, 2, ...), by token id."""
    if entries is None:
        return None
    texts = TokenTexts(tokenizer)
    result: list[dict[str, PromptLogprob] | None] = []
    for entry in entries:
        if entry is None:
            result.append(None)
            continue
        pairs = [(entry.token_id, entry.logprob, entry.rank)]
        pairs += [(t, v, r) for r, (t, v) in enumerate(entry.top_logprobs[:k], start=1)]
        by_id: dict[str, PromptLogprob] = {}
        for token_id, logprob, rank in pairs:
            by_id.setdefault(
                str(token_id),
                PromptLogprob(
                    logprob=clamp_logprob(logprob), rank=rank, decoded_token=texts[token_id]
                ),
            )
        result.append(by_id)
    return result


class TokenTexts(dict):
    """`token_text` of each id, decoded once per response (a prompt's alternatives repeat)."""

    def __init__(self, tokenizer: Any) -> None:
        super().__init__()
        self.tokenizer = tokenizer

    def __missing__(self, token_id: int) -> str:
        text = self[token_id] = token_text(self.tokenizer, token_id)
        return text


# One token of legacy completions logprobs: its id, its logprob (None: not scored, the prompt's
# first), its alternatives, and how far its text moves the offset (None: its own text's length).
LegacyToken = tuple[int, float | None, list[tuple[int, float]] | None, int | None]


def completion_logprobs(
    tokenizer: Any, items: list[LegacyToken], offset: int
) -> CompletionLogprobs:
    """Legacy (/v1/completions) logprobs: per token its text, logprob, the alternatives with the
    token itself among them (OpenAI's and vLLM's: up to logprobs + 1 entries), and where its
    text starts, counting from `offset`."""
    result = CompletionLogprobs()
    for token_id, logprob, alternatives, advance in items:
        text = token_text(tokenizer, token_id)
        result.tokens.append(text)
        result.text_offset.append(offset)
        offset += len(text) if advance is None else advance
        if logprob is None:
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
            continue
        clamped = clamp_logprob(logprob)
        result.token_logprobs.append(clamped)
        top = {text: clamped}
        for alt in top_alternatives(tokenizer, alternatives):
            top.setdefault(alt.token, alt.logprob)
        result.top_logprobs.append(top)
    return result
