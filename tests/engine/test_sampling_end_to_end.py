"""Sampling options through the whole engine: seeds, top-k, stops, lengths, n, logprobs."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from ocula import LLM, SamplingParams
from tests.engine.conftest import PROMPTS


@pytest.fixture(scope="module")
def llm(tiny_checkpoint) -> LLM:
    return LLM(str(tiny_checkpoint("qwen2")), max_total_token_num=2048)


def greedy_ids(llm: LLM, prompt: str, n: int = 16) -> list[int]:
    return llm.generate(prompt, SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True))[
        0
    ].token_ids


def test_same_seed_same_output_whatever_the_batch(llm: LLM) -> None:
    seeded = SamplingParams(
        temperature=1.0, top_p=0.9, seed=1234, max_new_tokens=16, ignore_eos=True
    )
    alone = llm.generate(PROMPTS[1], seeded)[0].token_ids
    unseeded = SamplingParams(temperature=1.0, max_new_tokens=16, ignore_eos=True)
    crowd = llm.generate([PROMPTS[0], PROMPTS[1], PROMPTS[2]], [unseeded, seeded, unseeded])[
        1
    ].token_ids
    assert alone == crowd
    other = SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_new_tokens=16, ignore_eos=True)
    assert llm.generate(PROMPTS[1], other)[0].token_ids != alone


def test_top_k_1_equals_greedy(llm: LLM) -> None:
    top1 = SamplingParams(temperature=1.3, top_k=1, max_new_tokens=16, ignore_eos=True)
    for prompt in PROMPTS:
        assert llm.generate(prompt, top1)[0].token_ids == greedy_ids(llm, prompt)


def test_stop_string_cuts_the_text_exactly(llm: LLM) -> None:
    reference = llm.generate(
        PROMPTS[2], SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)
    )[0]
    text = reference.text
    stop = text[5:8]
    assert stop and stop in text
    out = llm.generate(
        PROMPTS[2], SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True, stop=[stop])
    )[0]
    assert out.text == text[: text.index(stop)]
    assert out.finish_reason == "stop"
    assert out.outputs[0].stop_reason == stop
    kept = llm.generate(
        PROMPTS[2],
        SamplingParams(
            temperature=0,
            max_new_tokens=16,
            ignore_eos=True,
            stop=[stop],
            include_stop_str_in_output=True,
        ),
    )[0]
    assert kept.text == text[: text.index(stop) + len(stop)]
    assert llm.engine.core.scheduler.num_unfinished == 0


def test_stop_token_ids_eos_and_min_new_tokens(llm: LLM) -> None:
    greedy = greedy_ids(llm, PROMPTS[3])
    stop_id = greedy[2]
    first_hit = greedy.index(stop_id)
    out = llm.generate(
        PROMPTS[3], SamplingParams(temperature=0, max_new_tokens=16, stop_token_ids=[stop_id])
    )[0]
    assert out.token_ids == greedy[: first_hit + 1]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == stop_id
    # As an EOS id (from --eos_id) it stops the same way, unless ignore_eos.
    eos_llm = LLM(llm.engine.args.model_dir, max_total_token_num=512, eos_id=[stop_id])
    assert (
        eos_llm.generate(PROMPTS[3], SamplingParams(temperature=0, max_new_tokens=16))[0].token_ids
        == greedy[: first_hit + 1]
    )
    # min_new_tokens bans the stop id until enough tokens exist.
    held = llm.generate(
        PROMPTS[3],
        SamplingParams(
            temperature=0, max_new_tokens=16, min_new_tokens=6, stop_token_ids=[stop_id]
        ),
    )[0]
    assert len(held.token_ids) >= 6
    assert stop_id not in held.token_ids[:6]
    assert held.token_ids[:first_hit] == greedy[:first_hit]


def test_max_new_tokens_is_exact(llm: LLM) -> None:
    for n in (1, 5, 17):
        out = llm.generate(PROMPTS[0], SamplingParams(max_new_tokens=n, ignore_eos=True))[0]
        assert len(out.token_ids) == n and out.finish_reason == "length"


def test_n_samples_are_reproducible_and_distinct(llm: LLM) -> None:
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_new_tokens=12, ignore_eos=True)
    first = llm.generate(PROMPTS[1], params)[0]
    again = llm.generate(PROMPTS[1], params)[0]
    assert len(first.outputs) == 3
    assert [c.token_ids for c in first.outputs] == [c.token_ids for c in again.outputs]
    assert len({tuple(c.token_ids) for c in first.outputs}) > 1
    assert [c.index for c in first.outputs] == [0, 1, 2]


def test_logprobs_are_the_model_log_softmax(llm: LLM, tiny_checkpoint) -> None:
    params = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True, logprobs=3)
    out = llm.generate(PROMPTS[1], params)[0]
    model = AutoModelForCausalLM.from_pretrained(
        str(tiny_checkpoint("qwen2")), dtype=torch.float32
    ).eval()
    ids = torch.tensor([llm.tokenizer.encode(PROMPTS[1]) + out.token_ids])
    with torch.no_grad():
        logprobs = model(ids).logits[0].log_softmax(-1)
    start = out.prompt_tokens - 1
    for i, entry in enumerate(out.outputs[0].logprobs):
        row = logprobs[start + i]
        assert entry.token_id == out.token_ids[i]
        assert entry.logprob == pytest.approx(row[entry.token_id].item(), abs=1e-4)
        top_ids = [t for t, _ in entry.top_logprobs]
        assert top_ids == row.topk(3).indices.tolist()
