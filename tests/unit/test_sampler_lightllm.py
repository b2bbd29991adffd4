"""The sampler's options that LightLLM's `/generate` brings: which tokens the penalties count
(`penalty_scope`), `allowed_token_ids` and `exponential_decay_length_penalty`."""

from __future__ import annotations

import pytest
import torch

from ocula.sampling.batch import eos_length_gain
from ocula.sampling.param_checks import MAX_EOS_DECAY_GAIN
from ocula.sampling.params import SamplingParams
from ocula.sampling.sampler import Sampler, _apply_penalties_and_bans
from tests.unit.test_sampler import batch_of, make_request

LOGITS = [2.0, 1.0, -1.0, 0.5, 3.0, 0.0]


def processed(params: SamplingParams, prompt, output, eos=()) -> torch.Tensor:
    """The logits the sampler chooses from (penalties, gains, masks and bans applied)."""
    batch = batch_of([make_request(params, prompt, output, eos)])
    logits = torch.tensor([LOGITS])
    _apply_penalties_and_bans(logits, batch)
    return logits[0]


def lightllm_penalty(logits: list[float], counts: dict[int, int], rep, presence, freq):
    """LightLLM's formula on the tokens with a count: repetition first (divide a positive logit,
    multiply a negative one), then the count times frequency, then presence."""
    out = list(logits)
    for token, count in counts.items():
        value = out[token]
        value = value / rep if value > 0 else value * rep
        out[token] = value - count * freq - presence
    return torch.tensor(out)


@pytest.mark.parametrize(
    ("scope", "counted"),
    [
        ("output", {1: 2, 3: 1}),  # LightLLM's default: the output's tokens only
        ("prompt_and_output", {0: 1, 1: 3, 3: 1}),  # input_penalty: the prompt's too
    ],
)
def test_penalty_scopes_count_what_lightllm_counts(scope, counted) -> None:
    params = SamplingParams(
        temperature=0,
        repetition_penalty=1.5,
        presence_penalty=0.25,
        frequency_penalty=0.5,
        penalty_scope=scope,
    )
    ours = processed(params, prompt=[0, 1], output=[1, 1, 3])
    expected = lightllm_penalty(LOGITS, counted, 1.5, 0.25, 0.5)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_vllm_scope_keeps_the_prompt_for_the_repetition_penalty_only() -> None:
    params = SamplingParams(temperature=0, repetition_penalty=2.0, presence_penalty=1.0)
    ours = processed(params, prompt=[0], output=[3])
    expected = torch.tensor(LOGITS)
    expected[0] = LOGITS[0] / 2  # the prompt's token: repetition only
    expected[3] = LOGITS[3] / 2 - 1.0  # the output's: both
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_allowed_token_ids_leave_only_those_tokens() -> None:
    params = SamplingParams(temperature=1.0, allowed_token_ids=[2, 5, 99])
    ours = processed(params, prompt=[0], output=[])
    assert torch.isinf(ours).tolist() == [True, True, False, True, True, False]
    # Sampled many times, only the allowed ids come out; an unrestricted row beside it is free.
    rows = [make_request(params, [0]) for _ in range(200)] + [make_request(SamplingParams(), [0])]
    logits = torch.tensor([LOGITS] * len(rows))
    tokens = Sampler(torch.Generator().manual_seed(0))(logits, batch_of(rows)).token_ids
    assert set(tokens[:-1].tolist()) == {2, 5}


def test_exponential_decay_length_penalty_lifts_eos_past_its_start() -> None:
    params = SamplingParams(temperature=0, exponential_decay_length_penalty=(2, 1.5))
    assert eos_length_gain(params, 2) == 0.0  # not past the start yet
    assert eos_length_gain(params, 4) == pytest.approx(1.5**2 - 1)
    assert eos_length_gain(params, 10**6) == MAX_EOS_DECAY_GAIN  # capped, no overflow
    ours = processed(params, prompt=[0], output=[1, 1, 1, 1], eos=[2, 5])
    expected = torch.tensor(LOGITS)
    for eos in (2, 5):  # transformers' formula: logit + |logit| * (factor^(n - start) - 1)
        expected[eos] = LOGITS[eos] + abs(LOGITS[eos]) * (1.5**2 - 1)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("penalty_scope", "prompt", "penalty_scope"),
        ("allowed_token_ids", [-1], "allowed_token_ids"),
        ("allowed_token_ids", [600], r"outside \[0, 600\)"),
        ("exponential_decay_length_penalty", (1, 0.0), "factor > 0"),
        ("exponential_decay_length_penalty", (-1, 1.1), "start >= 0"),
        ("stop_token_sequences", [[]], "non-empty"),
        ("stop_token_sequences", [[1, 600]], r"outside \[0, 600\)"),
        ("presence_penalty", -2.5, r"\[-2, 1e\+06\]"),
    ],
)
def test_bad_values_are_named(field, value, message) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value}).validate(600)
