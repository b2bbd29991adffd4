"""The whole engine (scheduler, paged KV, sampler, detokenizer) against transformers' generate."""

from __future__ import annotations

from pathlib import Path

import pytest

from ocula import LLM, SamplingParams
from tests.engine.conftest import PROMPTS, reference_continuations

GREEDY = SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "internlm2"])
def test_greedy_tokens_equal_transformers_batched_and_one_by_one(
    tiny_checkpoint, arch: str
) -> None:
    checkpoint: Path = tiny_checkpoint(arch)
    expected = reference_continuations(checkpoint, PROMPTS, GREEDY.max_new_tokens)
    llm = LLM(str(checkpoint), max_total_token_num=1024)
    batched = llm.generate(list(PROMPTS), GREEDY)
    assert [out.token_ids for out in batched] == expected
    one_by_one = [llm.generate(prompt, GREEDY)[0] for prompt in PROMPTS]
    assert [out.token_ids for out in one_by_one] == expected
    for out in batched:
        assert out.finish_reason == "length"
        assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_mistral_sliding_window_shorter_than_the_prompt(tiny_checkpoint) -> None:
    checkpoint = tiny_checkpoint("mistral", sliding_window=5)
    expected = reference_continuations(checkpoint, PROMPTS, GREEDY.max_new_tokens)
    llm = LLM(str(checkpoint), max_total_token_num=1024, chunked_prefill_size=4)
    assert [out.token_ids for out in llm.generate(list(PROMPTS), GREEDY)] == expected
