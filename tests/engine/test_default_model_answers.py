"""The model a newcomer gets with no model folder: SmolLM2-135M-Instruct knows its capitals."""

from __future__ import annotations

import pytest

from ocula import LLM, SamplingParams
from tests.helpers.default_model import default_model_folder  # noqa: F401

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.slow
def test_default_model_answers_paris(default_model_folder, monkeypatch) -> None:  # noqa: F811
    # LLM() with no folder finds the converted model through the cache directory.
    monkeypatch.setenv("OCULA_CACHE_DIR", str(default_model_folder.parent))
    llm = LLM(max_total_token_num=4096)
    assert llm.engine.model_dir == default_model_folder
    [out] = llm.chat(QUESTION, SamplingParams(temperature=0, max_new_tokens=20))
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # it ends its answer with <|im_end|>
