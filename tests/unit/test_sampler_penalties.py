"""The sampler's penalties, bans and logit bias, against transformers and OpenAI's formulas."""

from __future__ import annotations

import dataclasses

import torch
from transformers import RepetitionPenaltyLogitsProcessor

from ocula.sampling.params import SamplingParams
from ocula.sampling.penalties import apply_presence_frequency_penalties, apply_repetition_penalty
from ocula.sampling.sampler import Sampler
from tests.unit.test_sampler import batch_of, make_request


def test_repetition_penalty_matches_hf() -> None:
    logits = torch.randn(3, 12, generator=torch.Generator().manual_seed(4)) * 2
    prompts = [[0, 1, 1, 5], [2], []]
    outputs = [[5, 7], [2, 3, 11], [4]]
    penalties = torch.tensor([1.3, 0.8, 1.0])
    ours = logits.clone()
    apply_repetition_penalty(ours, prompts, outputs, penalties)
    for row in range(3):
        processor = RepetitionPenaltyLogitsProcessor(penalty=float(penalties[row]))
        input_ids = torch.tensor([prompts[row] + outputs[row]])
        expected = processor(input_ids, logits[row : row + 1].clone())
        torch.testing.assert_close(ours[row : row + 1], expected, rtol=0, atol=0)


def test_presence_and_frequency_penalties_follow_openai() -> None:
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.5, 3.0, 0.0]])
    apply_presence_frequency_penalties(
        logits, [[1, 1, 3, 9]], [()], torch.tensor([0.25]), torch.tensor([0.5])
    )
    # token 1 twice: 2 * 0.5 + 0.25; token 3 once: 0.5 + 0.25; id 9 is outside the vocabulary.
    expected = torch.tensor([[1.0, 2.0 - 1.25, -1.0, 0.5 - 0.75, 3.0, 0.0]])
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)


def test_penalties_through_the_batch_builder() -> None:
    logits = torch.tensor([[3.0, 2.9, 0.0, 0.0]] * 3)
    requests = [
        make_request(SamplingParams(temperature=0, presence_penalty=0.5), [1], [0]),
        make_request(SamplingParams(temperature=0, repetition_penalty=1.2), [0], []),
        make_request(SamplingParams(temperature=0, presence_penalty=0.5), [0], []),  # prompt only
    ]
    batch = batch_of(requests)
    assert batch.prompt_token_ids[0] == () and batch.prompt_token_ids[1] == [0]
    assert Sampler()(logits, batch).token_ids.tolist() == [1, 1, 0]


def test_banned_ids_are_never_sampled_before_min_new_tokens() -> None:
    logits = torch.tensor([[0.0, 0.0, 9.0, 0.0, 0.0, 10.0]]).expand(300, -1).contiguous()
    eos = [5]
    params = SamplingParams(min_new_tokens=3, stop_token_ids=[2])
    early = make_request(params, [1], [0], eos)
    ignoring_eos = make_request(dataclasses.replace(params, ignore_eos=True), [1], [0], eos)
    done = make_request(params, [1], [0, 0, 0], eos)
    greedy_early = make_request(SamplingParams(temperature=0, min_new_tokens=2), [], [], eos)
    requests = [early, ignoring_eos, done, greedy_early] * 75
    batch = batch_of(requests)
    assert batch.banned_token_ids[:4] == [[2, 5], [2], [], [5]]
    token_ids = Sampler(torch.Generator().manual_seed(5))(logits, batch).token_ids
    assert not set(token_ids[0::4].tolist()) & {2, 5}
    assert 5 in token_ids[1::4].tolist() and 2 not in token_ids[1::4].tolist()
    assert 5 in token_ids[2::4].tolist()
    assert set(token_ids[3::4].tolist()) == {2}


def test_logit_bias_is_added_before_sampling_and_bans_still_win() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    greedy = SamplingParams(temperature=0)
    for bias, expected in [({0: 100.0}, 0), ({3: -100.0}, 2)]:  # forced; the argmax pushed out
        batch = batch_of([make_request(dataclasses.replace(greedy, logit_bias=bias))])
        assert batch.any_bias and Sampler()(logits, batch).token_ids.tolist() == [expected]
    # Biases add: 1 + 2.5 = 3.5 beats 3.0; another row of the batch is left alone.
    biased = make_request(dataclasses.replace(greedy, logit_bias={1: 2.5, 3: 0.0}))
    out = Sampler()(logits.expand(2, -1), batch_of([biased, make_request(greedy)]))
    assert out.token_ids.tolist() == [1, 3]
    # The logprobs reported stay the model's own.
    assert torch.allclose(out.logprobs[0], torch.log_softmax(logits[0], -1)[1])
    # A banned token (EOS before min_new_tokens) stays banned whatever its bias.
    banned = SamplingParams(temperature=0, min_new_tokens=2, logit_bias={0: 100.0})
    batch = batch_of([make_request(banned, [1], [], eos=[0])])
    assert Sampler()(logits, batch).token_ids.tolist() == [3]
