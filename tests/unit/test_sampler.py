"""The batched sampler: greedy, seeds, filters, penalties, bans and logprobs."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
import torch

from ocula.sampling.batch import SamplingBatch, seeded_generator
from ocula.sampling.params import SamplingParams
from ocula.sampling.sampler import Sampler, _apply_top_k_top_p

CPU = torch.device("cpu")
# A distribution with distinct probabilities, used by the frequency checks.
PROBS = [0.30, 0.25, 0.15, 0.12, 0.08, 0.05, 0.03, 0.02]
NUM_DRAWS = 20000


@dataclass
class FakeRequest:
    sampling_params: SamplingParams
    token_ids: list[int] = field(default_factory=list)
    num_prompt_tokens: int = 0
    eos_token_ids: frozenset[int] = frozenset()
    generator: torch.Generator | None = None


def make_request(params: SamplingParams, prompt=(), output=(), eos=()) -> FakeRequest:
    resolved = params.with_model_defaults({})
    resolved.validate()
    return FakeRequest(
        resolved,
        list(prompt) + list(output),
        len(prompt),
        frozenset(eos),
        seeded_generator(resolved.seed, CPU),
    )


def batch_of(requests: Sequence[FakeRequest]) -> SamplingBatch:
    return SamplingBatch.from_requests(requests, CPU)


def frequencies(params: SamplingParams, probs: Sequence[float] = PROBS) -> torch.Tensor:
    """Empirical token distribution of NUM_DRAWS rows that share `probs`, with a fixed seed."""
    logits = torch.tensor(probs).log().expand(NUM_DRAWS, -1).contiguous()
    requests = [make_request(params) for _ in range(NUM_DRAWS)]
    sampler = Sampler(torch.Generator().manual_seed(1234))
    token_ids = sampler(logits, batch_of(requests)).token_ids
    return torch.bincount(token_ids, minlength=len(probs)).double() / NUM_DRAWS


def renormalized(weights: Sequence[float], allowed: Sequence[int]) -> torch.Tensor:
    expected = torch.zeros(len(weights), dtype=torch.float64)
    for token in allowed:
        expected[token] = weights[token]
    return expected / expected.sum()


def assert_distribution(observed: torch.Tensor, expected: torch.Tensor) -> None:
    # Never-allowed tokens must have exactly zero draws; the rest within ~4 sigma at 20000 draws.
    assert torch.all(observed[expected == 0] == 0), observed
    assert torch.max((observed - expected).abs()) < 0.015, (observed, expected)


def test_all_greedy_fast_path_is_argmax_and_leaves_logits_alone() -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    output = Sampler()(logits, batch_of([make_request(SamplingParams(temperature=0))] * 6))
    assert torch.equal(output.token_ids, logits.argmax(-1))
    assert torch.equal(logits, before)
    assert output.token_ids.dtype == torch.int64 and output.logprobs.dtype == torch.float32


def test_top_k_1_equals_greedy_with_penalties() -> None:
    logits = torch.randn(16, 40, generator=torch.Generator().manual_seed(1))
    penalties = {"repetition_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": 0.3}
    greedy = [make_request(SamplingParams(temperature=0, **penalties), [1, 2], [3, 3])] * 16
    top1 = [make_request(SamplingParams(temperature=1.5, top_k=1, **penalties), [1, 2], [3, 3])]
    sampler = Sampler(torch.Generator().manual_seed(0))
    greedy_ids = sampler(logits, batch_of(greedy)).token_ids
    assert torch.equal(sampler(logits, batch_of(top1 * 16)).token_ids, greedy_ids)


def test_greedy_rows_ignore_filters_in_a_mixed_batch() -> None:
    logits = torch.randn(8, 30, generator=torch.Generator().manual_seed(2))
    greedy = make_request(SamplingParams(temperature=0, top_k=3, top_p=0.1, min_p=0.9))
    sampled = make_request(SamplingParams(temperature=1.0, top_p=0.9, seed=5))
    output = Sampler()(logits, batch_of([greedy, sampled] * 4))
    assert torch.equal(output.token_ids[0::2], logits[0::2].argmax(-1))


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1e-39, seed=1),  # logits / t overflow float32
        SamplingParams(temperature=1e-6, seed=2),  # below vLLM's 1e-5: greedy
        SamplingParams(top_p=1e-46, seed=3),  # 0 in float32
        SamplingParams(top_p=1e-300, top_k=5, seed=4),  # the partial top-k path
    ],
)
def test_vanishing_temperature_or_top_p_is_the_argmax(params: SamplingParams) -> None:
    logits = torch.randn(4, 60, generator=torch.Generator().manual_seed(7)) * 5
    output = Sampler(torch.Generator().manual_seed(0))(
        logits.clone(), batch_of([make_request(params)] * 4)
    )
    assert torch.equal(output.token_ids, logits.argmax(-1))
    assert make_request(params).sampling_params.is_greedy == (params.top_p is None)


def test_same_seed_same_tokens_whatever_the_batch() -> None:
    steps = 30
    step_logits = torch.randn(steps, 1000, generator=torch.Generator().manual_seed(3))

    def run(seed: int, position: int, others: list[SamplingParams]) -> list[int]:
        target = make_request(SamplingParams(temperature=1.0, seed=seed))
        companions = [make_request(p) for p in others]
        rows = [*companions[:position], target, *companions[position:]]
        sampler = Sampler(torch.Generator().manual_seed(position))
        tokens = []
        for step in range(steps):
            logits = torch.randn(len(rows), 1000) * 3
            logits[position] = step_logits[step]
            tokens.append(int(sampler(logits, batch_of(rows)).token_ids[position]))
        return tokens

    alone = run(7, 0, [])
    mixed = [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=0, seed=1),
        SamplingParams(temperature=1.0, seed=7, top_k=5),
    ]
    assert run(7, 1, mixed) == alone
    assert run(7, 3, mixed) == alone
    assert run(7, 2, mixed[:2]) == alone
    assert run(8, 0, []) != alone


def test_top_k_keeps_the_k_most_likely() -> None:
    assert_distribution(frequencies(SamplingParams(top_k=3)), renormalized(PROBS, [0, 1, 2]))


def test_top_k_beyond_the_vocabulary_and_int64_keeps_every_token() -> None:
    """A client's top_k of 2**63 once overflowed the batch's int64 tensor and ended the engine."""
    everything = renormalized(PROBS, list(range(len(PROBS))))
    for top_k in (len(PROBS), 2**63, 10**30):
        assert_distribution(frequencies(SamplingParams(top_k=top_k)), everything)


def test_top_k_with_temperature() -> None:
    observed = frequencies(SamplingParams(top_k=4, temperature=2.0))
    assert_distribution(observed, renormalized([p**0.5 for p in PROBS], [0, 1, 2, 3]))


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    # Cumulative mass 0.30, 0.55, 0.70, 0.82: p = 0.75 needs the first four tokens.
    assert_distribution(frequencies(SamplingParams(top_p=0.75)), renormalized(PROBS, range(4)))
    # p below the largest probability keeps only the most likely token.
    assert_distribution(frequencies(SamplingParams(top_p=0.2)), renormalized(PROBS, [0]))


def test_min_p_drops_tokens_below_a_fraction_of_the_max() -> None:
    # 0.3 * 0.30 = 0.09: tokens with probability 0.12 and above stay.
    assert_distribution(frequencies(SamplingParams(min_p=0.3)), renormalized(PROBS, range(4)))


def test_filters_compose_in_order() -> None:
    # temperature 0.5 squares the probabilities: 0.09, 0.0625, 0.0225, 0.0144, 0.0064 ... ;
    # top_k 5 keeps five; normalized over them: 0.459, 0.319, 0.115, 0.073, 0.033;
    # top_p 0.85 keeps 0.459 + 0.319 + 0.115 = 0.893; min_p 0.3 then drops 0.115 < 0.138.
    observed = frequencies(SamplingParams(temperature=0.5, top_k=5, top_p=0.85, min_p=0.3))
    assert_distribution(observed, renormalized([p * p for p in PROBS], [0, 1]))


def test_rows_with_different_filters_in_one_batch() -> None:
    logits = torch.tensor(PROBS).log().expand(3000, -1).contiguous()
    kinds = [SamplingParams(top_k=2), SamplingParams(top_p=0.5), SamplingParams(top_k=-1)]
    requests = [make_request(kinds[i % 3]) for i in range(3000)]
    token_ids = Sampler(torch.Generator().manual_seed(9))(logits, batch_of(requests)).token_ids
    assert set(token_ids[0::3].tolist()) == {0, 1}
    assert set(token_ids[1::3].tolist()) == {0, 1}
    assert len(set(token_ids[2::3].tolist())) == len(PROBS)
    # Without top_p the sampler takes a partial top-k; k off (-1) and k > V keep everything.
    kinds = [SamplingParams(top_k=2), SamplingParams(top_k=-1), SamplingParams(top_k=100)]
    requests = [make_request(kinds[i % 3]) for i in range(3000)]
    token_ids = Sampler(torch.Generator().manual_seed(9))(logits, batch_of(requests)).token_ids
    assert set(token_ids[0::3].tolist()) == {0, 1}
    assert len(set(token_ids[1::3].tolist())) == len(PROBS)
    assert len(set(token_ids[2::3].tolist())) == len(PROBS)


def test_logprobs_are_the_raw_model_logprobs() -> None:
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(6)) * 3
    requests = [
        make_request(
            SamplingParams(temperature=0.5, top_k=8, logprobs=5, repetition_penalty=1.5),
            [1, 2],
            [3],
        ),
        make_request(SamplingParams(temperature=0, logprobs=2, presence_penalty=1.0), [], [4]),
        make_request(SamplingParams(top_p=0.9, seed=3)),
        make_request(SamplingParams(min_p=0.1, logprobs=0)),
    ]
    batch = batch_of(requests)
    assert batch.num_logprobs == 5
    output = Sampler(torch.Generator().manual_seed(7))(logits, batch)
    reference = torch.log_softmax(logits, dim=-1)
    chosen = reference.gather(1, output.token_ids.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(output.logprobs, chosen)
    assert output.top_logprobs is not None and output.top_logprob_ids is not None
    assert output.top_logprobs.shape == (4, 5)
    assert torch.all(output.top_logprobs[:, :-1] >= output.top_logprobs[:, 1:])
    torch.testing.assert_close(output.top_logprobs, reference.gather(1, output.top_logprob_ids))
    assert torch.equal(output.top_logprob_ids[:, 0], logits.argmax(-1))


def test_no_top_logprobs_unless_asked() -> None:
    output = Sampler()(torch.randn(2, 10), batch_of([make_request(SamplingParams())] * 2))
    assert output.top_logprobs is None and output.top_logprob_ids is None
    assert math.isfinite(float(output.logprobs.sum()))


def test_wrong_row_count_is_rejected() -> None:
    with pytest.raises(ValueError, match="rows"):
        Sampler()(torch.randn(3, 10), batch_of([make_request(SamplingParams())]))


def test_top_k_with_top_p_matches_the_full_sort(monkeypatch: pytest.MonkeyPatch) -> None:
    # Rows that pair top_p with top_k filter a partial top-k; the sorting path must agree.
    logits = torch.randn(48, 3000, generator=torch.Generator().manual_seed(10)) * 4
    kinds = [
        SamplingParams(top_k=40, top_p=0.8),
        SamplingParams(top_k=3, top_p=0.99, temperature=0.6, seed=11),
        SamplingParams(top_k=200, top_p=0.5, min_p=0.05),
        SamplingParams(top_k=-1),  # top_k and top_p off: keeps everything
        SamplingParams(top_k=7),
        SamplingParams(temperature=0, top_p=0.3),
    ]

    def fresh_batch() -> SamplingBatch:  # seeded rows need fresh generators for each run
        return batch_of([make_request(kinds[i % len(kinds)]) for i in range(48)])

    batch = fresh_batch()
    assert batch.use_top_p and batch.top_p_within_top_k
    by_sorting = dataclasses.replace(fresh_batch(), top_p_within_top_k=False)
    expected = Sampler(torch.Generator().manual_seed(12))(logits, by_sorting).token_ids

    def no_sort(*args: object, **kwargs: object) -> None:
        raise AssertionError("the vocabulary was sorted")

    monkeypatch.setattr(torch, "sort", no_sort)
    observed = Sampler(torch.Generator().manual_seed(12))(logits, batch).token_ids
    assert torch.equal(observed, expected)


def test_top_k_with_top_p_keeps_the_same_tokens_as_the_full_sort() -> None:
    logits = torch.randn(30, 500, generator=torch.Generator().manual_seed(14)) * 3
    kinds = [
        SamplingParams(top_k=25, top_p=0.6),
        SamplingParams(top_k=1, top_p=0.9),
        SamplingParams(top_k=-1, top_p=1.0),
        SamplingParams(top_k=499, top_p=0.95),
        SamplingParams(top_k=10),
    ]
    batch = batch_of([make_request(kinds[i % len(kinds)]) for i in range(30)])
    partial, full = logits.clone(), logits.clone()
    _apply_top_k_top_p(partial, batch)
    _apply_top_k_top_p(full, dataclasses.replace(batch, top_p_within_top_k=False))
    assert torch.equal(partial, full)
    assert torch.all(torch.isfinite(partial[2::5]))  # top_k and top_p off: nothing masked
    assert torch.equal(torch.isfinite(partial[1::5]).sum(-1), torch.ones(6, dtype=torch.int64))


def test_the_batch_says_when_top_p_needs_a_full_sort() -> None:
    batch = batch_of(
        [make_request(SamplingParams(top_k=5, top_p=0.9)), make_request(SamplingParams(top_p=0.9))]
    )
    assert batch.use_top_p and not batch.top_p_within_top_k
    greedy_only = batch_of(
        [
            make_request(SamplingParams(top_k=5)),
            make_request(SamplingParams(temperature=0, top_p=0.5)),
        ]
    )
    assert not greedy_only.use_top_p and greedy_only.top_p_within_top_k
