"""What the model runner keeps to sample each request, and the sampling of one step.

Only rank 0 samples under tensor parallelism. The state of a request (its resolved options, a
seeded generator, its token history for the penalties) is created once from the plan's
`new_requests` and dropped with `finished_request_ids`.

Sampling does not wait for the device: `sample` queues the sampler and the copy of its results
to pinned host memory and returns `PendingSamples`; `resolve` waits for that copy. Until then
the request's history ends in PLACEHOLDER_TOKEN (its length, which `min_new_tokens` reads, is
right). A step whose rows use penalties, which read the tokens themselves, resolves every
pending step first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ocula.engine.outputs import TokenLogprob
from ocula.engine.request import PLACEHOLDER_TOKEN
from ocula.engine.step_plan import NewRequestData, SampledToken, StepPlan
from ocula.sampling.batch import SamplingBatch, reads_output_tokens, seeded_generator
from ocula.sampling.params import SamplingParams
from ocula.sampling.sampler import Sampler, SamplerOutput


@dataclass
class RequestSamplingState:
    """What the runner keeps per request to sample it (a `SamplingRequest` for the sampler)."""

    sampling_params: SamplingParams  # resolved
    token_ids: list[int]  # prompt, then every sampled token
    num_prompt_tokens: int
    eos_token_ids: frozenset[int]
    generator: torch.Generator | None
    # The prompt's logprobs computed so far, by the position of the token they are about; sent
    # with the first sampled token (a recomputed chunk overwrites its positions).
    prompt_logprobs: dict[int, TokenLogprob] = field(default_factory=dict)
    prompt_logprobs_sent: bool = False


@dataclass
class PendingSamples:
    """One step's sampled tokens on their way to the host."""

    request_ids: list[str]
    states: list[RequestSamplingState]  # held here: a request may finish before `resolve`
    positions: list[int]  # where each token goes in its state's history
    token_ids: torch.Tensor  # [S] int64, on the device (the runner feeds the next step from it)
    host: SamplerOutput  # the same results in (pinned) host memory once `ready` has passed
    ready: torch.cuda.Event | None  # None on the CPU: `host` is complete already
    tokens: list[SampledToken] | None = None


class RequestSampler:
    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        default_generator = torch.Generator(device=device)
        default_generator.manual_seed(seed)
        self.sampler = Sampler(default_generator)
        self._states: dict[str, RequestSamplingState] = {}
        self._unresolved: list[PendingSamples] = []

    def warm_up(self, logits: torch.Tensor) -> None:
        """Runs every path of the sampler once on `logits` ([1, V] float32; the model's width)
        and waits for it. CUDA loads a kernel the first time it runs: without this the first
        request's sampling took 140 ms on an H200 (torch.logsumexp alone 120 ms). Draws from
        generators of its own: the sampler's generator, and so later tokens, are untouched."""
        greedy = SamplingParams(temperature=0.0, logprobs=2)
        penalized = SamplingParams(temperature=0.0, repetition_penalty=1.1)
        filtered = SamplingParams(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, seed=1)
        nucleus = SamplingParams(temperature=0.7, top_p=0.9, presence_penalty=0.5)
        # The plain argmax path; top-p within top-k; the full penalty + sort path, greedy mixed in.
        for row_params in ([greedy], [filtered], [penalized, filtered, nucleus]):
            states = [
                RequestSamplingState(
                    params.with_model_defaults(None),
                    [0, 1, 2],  # two prompt tokens and one output token, for the penalties
                    2,
                    frozenset(),
                    seeded_generator(params.seed, self.device),
                )
                for params in row_params
            ]
            batch = SamplingBatch.from_requests(states, device=self.device)
            result = Sampler(torch.Generator(self.device))(logits.expand(len(states), -1), batch)
            if self.device.type == "cuda":
                for tensor in _fields(result):
                    _to_pinned_host(tensor)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

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

    def prompt_alternatives(self, plan: StepPlan) -> dict[str, int]:
        """How many alternatives each of the plan's prompt-logprob sequences wants."""
        return {
            seq.request_id: self._states[seq.request_id].sampling_params.prompt_logprobs or 0
            for seq in plan.sequences
            if seq.prompt_logprob_targets
        }

    def add_prompt_logprobs(
        self, request_id: str, first_position: int, entries: list[TokenLogprob]
    ) -> None:
        state = self._states[request_id]
        for offset, entry in enumerate(entries):
            state.prompt_logprobs[first_position + offset] = entry

    def sample(self, plan: StepPlan, logits: torch.Tensor) -> PendingSamples:
        """Queues the sampling of the plan's sampling sequences (rows of `logits`, in order)."""
        sampling_seqs = [s for s in plan.sequences if s.samples]
        states = [self._states[s.request_id] for s in sampling_seqs]
        if self._unresolved and any(reads_output_tokens(s.sampling_params) for s in states):
            for pending in list(self._unresolved):
                self.resolve(pending)
        batch = SamplingBatch.from_requests(states, device=self.device)
        result = self.sampler(logits, batch)
        positions = []
        for state in states:
            positions.append(len(state.token_ids))
            state.token_ids.append(PLACEHOLDER_TOKEN)
        ready = None
        host = result
        if self.device.type == "cuda":
            host = SamplerOutput(*(_to_pinned_host(t) for t in _fields(result)))
            ready = torch.cuda.Event()
            ready.record()
        pending = PendingSamples(
            [s.request_id for s in sampling_seqs], states, positions, result.token_ids, host, ready
        )
        self._unresolved.append(pending)
        return pending

    def resolve(self, pending: PendingSamples) -> list[SampledToken]:
        """The step's tokens, in plan order, waiting for the device if needed (idempotent)."""
        if pending.tokens is not None:
            return pending.tokens
        if pending.ready is not None:
            pending.ready.synchronize()
        self._unresolved.remove(pending)
        result = pending.host
        token_ids = result.token_ids.tolist()
        logprobs = result.logprobs.tolist()
        top_ids = top_vals = None
        if result.top_logprob_ids is not None and result.top_logprobs is not None:
            top_ids = result.top_logprob_ids.tolist()
            top_vals = result.top_logprobs.tolist()
        sampled: list[SampledToken] = []
        for i, (request_id, state) in enumerate(
            zip(pending.request_ids, pending.states, strict=True)
        ):
            state.token_ids[pending.positions[i]] = token_ids[i]
            wanted = state.sampling_params.logprobs
            top = None
            if wanted and top_ids is not None and top_vals is not None:
                top = list(zip(top_ids[i][:wanted], top_vals[i][:wanted], strict=True))
            logprob = logprobs[i] if wanted is not None else None
            token = SampledToken(request_id, token_ids[i], logprob, top)
            if pending.positions[i] == state.num_prompt_tokens:  # the request's first token
                token.prompt_logprobs = _take_prompt_logprobs(state)
            sampled.append(token)
        pending.tokens = sampled
        return sampled


def _take_prompt_logprobs(state: RequestSamplingState) -> list[TokenLogprob | None] | None:
    """The prompt's logprobs, in prompt order (None for the first token), once: None when the
    request did not ask for them or has had them."""
    if state.sampling_params.prompt_logprobs is None or state.prompt_logprobs_sent:
        return None
    state.prompt_logprobs_sent = True
    entries = [state.prompt_logprobs.get(p) for p in range(1, state.num_prompt_tokens)]
    state.prompt_logprobs.clear()
    return [None, *entries]


def _fields(result: SamplerOutput) -> list[torch.Tensor | None]:
    return [result.token_ids, result.logprobs, result.top_logprob_ids, result.top_logprobs]


def _to_pinned_host(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """Queues a device-to-host copy that does not block the host (read it after the event)."""
    if tensor is None:
        return None
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host
