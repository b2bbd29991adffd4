"""RequestSampler.warm_up: every sampler path runs once, and later tokens do not change."""

from __future__ import annotations

import torch

from ocula.engine import runner_sampling
from ocula.engine.runner_sampling import RequestSampler
from ocula.sampling.batch import SamplingBatch
from ocula.sampling.sampler import _needs_processing

CPU = torch.device("cpu")


def test_warm_up_runs_every_path_and_leaves_the_generator_alone(monkeypatch) -> None:
    built: list[SamplingBatch] = []
    original = SamplingBatch.from_requests

    def recording(requests, device):
        batch = original(requests, device)
        built.append(batch)
        return batch

    monkeypatch.setattr(runner_sampling.SamplingBatch, "from_requests", recording)
    sampler = RequestSampler(CPU, seed=7)
    before = sampler.sampler.generator.get_state()
    sampler.warm_up(torch.randn(1, 1000, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(sampler.sampler.generator.get_state(), before)

    # The plain argmax path with top logprobs.
    assert any(not _needs_processing(b) and b.num_logprobs > 0 for b in built)
    # Top-p within top-k (no full sort), and top-p with a full sort.
    assert any(b.use_top_p and b.top_p_within_top_k for b in built)
    assert any(b.use_top_p and not b.top_p_within_top_k for b in built)
    assert any(b.use_min_p for b in built)
    # Penalties, greedy rows mixed with sampled ones, seeded rows next to unseeded ones.
    assert any(b.use_repetition_penalty and b.use_presence_frequency_penalty for b in built)
    assert any(b.any_greedy and not b.all_greedy for b in built)
    assert any(
        any(g is None for g in b.generators) and any(g is not None for g in b.generators)
        for b in built
    )
