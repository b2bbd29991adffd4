"""Prompt logprobs against transformers: every prompt position's log-probability of the next
prompt token and its most likely alternatives, across prefill chunks, prefix-cache hits and n."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ocula import LLM, SamplingParams
from tests.engine.conftest import PROMPTS

K = 3


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint("qwen2")


@pytest.fixture(scope="module")
def reference(checkpoint):
    """transformers' float32 log-softmax over each prompt: row p is the distribution of token
    p + 1."""
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    tables = {}
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([tokenizer.encode(prompt)])
            logits = model(ids, attention_mask=torch.ones_like(ids)).logits[0]
            tables[prompt] = (ids[0].tolist(), torch.log_softmax(logits.float(), dim=-1))
    return tables


def check(output, reference_table) -> None:
    ids, logprobs = reference_table
    entries = output.prompt_logprobs
    assert entries is not None and len(entries) == len(ids) and entries[0] is None
    for position in range(1, len(ids)):
        entry = entries[position]
        expected = logprobs[position - 1]
        assert entry.token_id == ids[position]
        assert entry.logprob == pytest.approx(expected[ids[position]].item(), abs=1e-4)
        top_values, top_ids = expected.topk(K)
        assert [token for token, _ in entry.top_logprobs] == top_ids.tolist()
        assert [v for _, v in entry.top_logprobs] == pytest.approx(top_values.tolist(), abs=1e-4)


def test_prompt_logprobs_equal_transformers_in_any_chunking(checkpoint, reference) -> None:
    params = SamplingParams(temperature=0, max_new_tokens=2, prompt_logprobs=K)
    for chunk in (8192, 4):  # one chunk per prompt, then chunks of 4 across the positions
        llm = LLM(str(checkpoint), max_total_token_num=1024, chunked_prefill_size=chunk)
        for prompt, output in zip(PROMPTS, llm.generate(list(PROMPTS), params), strict=True):
            check(output, reference[prompt])
        # The same prompts again: the prefix cache holds them, yet every position is computed.
        for prompt, output in zip(PROMPTS, llm.generate(list(PROMPTS), params), strict=True):
            check(output, reference[prompt])
        # Without the option: no prompt logprobs, and the cache is used again.
        plain = llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_new_tokens=2))[0]
        assert plain.prompt_logprobs is None and plain.num_cached_tokens > 0


def test_n_samples_share_one_computation(checkpoint, reference) -> None:
    llm = LLM(str(checkpoint), max_total_token_num=1024)
    params = SamplingParams(n=3, seed=5, max_new_tokens=3, prompt_logprobs=0)
    output = llm.generate(PROMPTS[1], params)[0]
    assert len(output.outputs) == 3
    ids, logprobs = reference[PROMPTS[1]]
    assert [e.top_logprobs for e in output.prompt_logprobs[1:]] == [[]] * (len(ids) - 1)
    for position in range(1, len(ids)):
        expected = logprobs[position - 1][ids[position]].item()
        assert output.prompt_logprobs[position].logprob == pytest.approx(expected, abs=1e-4)


def test_preemption_and_a_small_pool_keep_the_prompt_logprobs_whole(checkpoint, reference):
    # Prompts chunked by 4 into a KV pool too small for all of them at once: requests are
    # preempted, some before their first token (their prompt positions are computed again).
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True, prompt_logprobs=K)
    llm = LLM(str(checkpoint), max_total_token_num=64, chunked_prefill_size=4)
    outputs = llm.generate(list(PROMPTS) * 2, params)
    assert llm.engine.stats().num_preemptions > 0
    for prompt, output in zip(list(PROMPTS) * 2, outputs, strict=True):
        check(output, reference[prompt])
