"""What the model runner keeps to sample each request, and the sampling of one step.

Only rank 0 samples under tensor parallelism. The state of a request (its resolved options, a
seeded generator, its token history for the penalties) is created once from the plan's
`new_requests` and dropped with `finished_request_ids`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ocula.engine.step_plan import NewRequestData, SampledToken, StepPlan
from ocula.sampling.batch import SamplingBatch, seeded_generator
from ocula.sampling.params import SamplingParams
from ocula.sampling.sampler import Sampler


@dataclass
class RequestSamplingState:
    """What the runner keeps per request to sample it (a `SamplingRequest` for the sampler)."""

    sampling_params: SamplingParams  # resolved
    token_ids: list[int]  # prompt, then every sampled token
    num_prompt_tokens: int
    eos_token_ids: frozenset[int]
    generator: torch.Generator | None


class RequestSampler:
    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        default_generator = torch.Generator(device=device)
        default_generator.manual_seed(seed)
        self.sampler = Sampler(default_generator)
        self._states: dict[str, RequestSamplingState] = {}

    def follow(self, plan: StepPlan) -> None:
        """Drops the finished requests' states and creates the new ones'."""
        for request_id in plan.finished_request_ids:
            self._states.pop(request_id, None)
        for new in plan.new_requests:
            self._states[new.request_id] = self._new_state(new)

    def _new_state(self, new: NewRequestData) -> RequestSamplingState:
        return RequestSamplingState(
            new.sampling_params,
            list(new.prompt_token_ids),
            len(new.prompt_token_ids),
            new.eos_token_ids,
            seeded_generator(new.sampling_params.seed, self.device),
        )

    def sample(self, plan: StepPlan, logits: torch.Tensor) -> list[SampledToken]:
        sampling_seqs = [s for s in plan.sequences if s.samples]
        states = [self._states[s.request_id] for s in sampling_seqs]
        batch = SamplingBatch.from_requests(states, device=self.device)
        result = self.sampler(logits, batch)
        token_ids = result.token_ids.tolist()
        logprobs = result.logprobs.tolist() if result.logprobs is not None else None
        top_ids = top_vals = None
        if result.top_logprob_ids is not None:
            top_ids = result.top_logprob_ids.tolist()
            top_vals = result.top_logprobs.tolist()
        sampled: list[SampledToken] = []
        for i, (seq, state) in enumerate(zip(sampling_seqs, states, strict=True)):
            state.token_ids.append(token_ids[i])
            wanted = state.sampling_params.logprobs
            top = None
            if wanted and top_ids is not None:
                top = list(zip(top_ids[i][:wanted], top_vals[i][:wanted], strict=True))
            sampled.append(
                SampledToken(
                    seq.request_id,
                    token_ids[i],
                    logprobs[i] if (logprobs is not None and wanted is not None) else None,
                    top,
                )
            )
        return sampled
