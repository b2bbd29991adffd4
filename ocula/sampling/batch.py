"""The sampler's per-step input: one typed value with the parameters of every sampling row.

Row i of `SamplingBatch` describes row i of the logits `[S, V]` handed to the sampler. Tensors
live on the logits' device; the boolean summaries (`all_greedy`, `use_top_k`, ...) are computed on
the host when the batch is built, so the sampler picks its code path without reading device
tensors back (no host sync on GPU).
"""

from __future__ import annotations

from collections.abc import Sequence, Set
from dataclasses import dataclass
from typing import Protocol

import torch

from ocula.sampling.param_checks import MAX_EOS_DECAY_GAIN
from ocula.sampling.params import (
    DEFAULT_MIN_P,
    DEFAULT_REPETITION_PENALTY,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    SamplingParams,
)
from ocula.utils.device import host_arrays_to_device

TOP_K_CEILING = 2**31 - 1


class SamplingRequest(Protocol):
    """What the batch builder reads from a request (the engine's `Request` satisfies it)."""

    @property
    def sampling_params(self) -> SamplingParams:
        """Resolved params (`with_model_defaults` applied); None knobs fall back to globals."""
        ...

    @property
    def token_ids(self) -> Sequence[int]:
        """The prompt followed by every token generated so far."""
        ...

    @property
    def num_prompt_tokens(self) -> int: ...

    @property
    def eos_token_ids(self) -> Set[int]: ...

    @property
    def generator(self) -> torch.Generator | None:
        """The request's own generator when it has a seed (see `seeded_generator`), else None."""
        ...


def host_to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of `values` on `device` without a host sync: on CUDA the values are staged in
    pinned memory and copied asynchronously (a pageable source may make the copy wait for the
    stream); the caching host allocator keeps the staging buffer alive until the copy is done."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    staged = torch.tensor(values, dtype=dtype, pin_memory=True)
    return staged.to(device, non_blocking=True)


def seeded_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """The generator a request with `seed` keeps for its whole life (None without a seed).

    Create it once per request on the logits' device and reuse it every step: the sampler draws
    exactly one [V] row of exponentials from it per step, so the tokens depend only on the seed
    and the logits, never on the other rows of the batch.
    """
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


@dataclass
class SamplingBatch:
    """Per-row sampling parameters for one step. Every tensor is [S] on the logits' device."""

    temperatures: torch.Tensor  # float32; 0 = greedy
    top_ps: torch.Tensor  # float32 in (0, 1]; 1 = off
    top_ks: torch.Tensor  # int64; -1 or 0 = off
    min_ps: torch.Tensor  # float32 in [0, 1]; 0 = off
    repetition_penalties: torch.Tensor  # float32 > 0; 1 = off
    presence_penalties: torch.Tensor  # float32; 0 = off
    frequency_penalties: torch.Tensor  # float32; 0 = off
    generators: list[torch.Generator | None]  # per row: its own generator if seeded
    # Token lists for the penalties. The builder leaves a row's lists empty when that row's
    # penalties are neutral, so long prompts are not copied for nothing.
    prompt_token_ids: list[Sequence[int]]  # repetition penalty (empty: penalty_scope "output")
    output_token_ids: list[Sequence[int]]  # repetition, presence and frequency penalties
    # The prompt again where presence and frequency count it (penalty_scope "prompt_and_output").
    counted_prompt_token_ids: list[Sequence[int]]
    allowed_token_ids: list[Sequence[int]]  # only these may be sampled (empty: any)
    # exponential_decay_length_penalty: each row's EOS ids and the relative gain of their logits
    # this step (rows without a gain have no ids).
    eos_gain_token_ids: list[Sequence[int]]
    eos_gains: list[float]
    # logits set to -inf: banned_token_ids, and EOS/stop ids before min_new_tokens
    banned_token_ids: list[Sequence[int]]
    bias_token_ids: list[Sequence[int]]  # logit_bias: tokens of each row, distinct
    bias_values: list[Sequence[float]]  # ... and what is added to their logits
    num_logprobs: int  # largest k requested over the rows (0 if none asked for alternatives)
    # Host-side summaries of the tensors above; they must agree with them.
    all_greedy: bool
    any_greedy: bool
    use_top_k: bool
    max_top_k: int  # largest enabled top_k over the rows (0 if none)
    use_top_p: bool
    use_min_p: bool
    # Every sampled row with top_p < 1 also has top_k > 0: top_p then only ever looks at the
    # max_top_k largest logits of a row, so no full sort of the vocabulary is needed.
    top_p_within_top_k: bool
    use_repetition_penalty: bool
    use_presence_frequency_penalty: bool
    any_banned: bool
    any_bias: bool
    any_allowed: bool
    any_eos_gain: bool

    @property
    def num_rows(self) -> int:
        return len(self.generators)

    @classmethod
    def from_requests(
        cls, requests: Sequence[SamplingRequest], device: torch.device
    ) -> SamplingBatch:
        """Builds the batch for `requests`, one row each, in order.

        A request whose output is shorter than its `min_new_tokens` has its stop token ids banned,
        and its EOS ids too unless it ignores EOS.
        """
        temperatures, top_ps, top_ks, min_ps = [], [], [], []
        repetition, presence, frequency = [], [], []
        prompts: list[Sequence[int]] = []
        outputs: list[Sequence[int]] = []
        counted_prompts: list[Sequence[int]] = []
        allowed: list[Sequence[int]] = []
        eos_gain_ids: list[Sequence[int]] = []
        eos_gains: list[float] = []
        banned: list[Sequence[int]] = []
        bias_ids: list[Sequence[int]] = []
        bias_values: list[Sequence[float]] = []
        num_logprobs = 0
        for request in requests:
            params = request.sampling_params
            temperature = _or(params.temperature, DEFAULT_TEMPERATURE)
            # Any k at or above the vocabulary keeps every token (the sampler clamps to it); the
            # ceiling keeps a client's 2**63 from overflowing the int64 tensor.
            top_k = min(_or(params.top_k, DEFAULT_TOP_K), TOP_K_CEILING)
            rep = _or(params.repetition_penalty, DEFAULT_REPETITION_PENALTY)
            temperatures.append(temperature)
            top_ps.append(_or(params.top_p, DEFAULT_TOP_P))
            top_ks.append(top_k)
            min_ps.append(_or(params.min_p, DEFAULT_MIN_P))
            repetition.append(rep)
            presence.append(params.presence_penalty)
            frequency.append(params.frequency_penalty)

            token_ids = request.token_ids
            split = request.num_prompt_tokens
            uses_output = reads_output_tokens(params)
            scope = params.penalty_scope
            prompts.append(token_ids[:split] if rep != 1.0 and scope != "output" else ())
            outputs.append(token_ids[split:] if uses_output else ())
            counts_prompt = uses_output and scope == "prompt_and_output"
            counted_prompts.append(
                token_ids[:split]
                if counts_prompt and (params.presence_penalty or params.frequency_penalty)
                else ()
            )
            allowed.append(params.allowed_token_ids)
            gain = 0.0
            if params.exponential_decay_length_penalty is not None:
                gain = eos_length_gain(params, len(token_ids) - split)
            eos_gain_ids.append(sorted(request.eos_token_ids) if gain else ())
            eos_gains.append(gain)

            row_banned: list[int] = list(params.banned_token_ids)
            if len(token_ids) - split < params.min_new_tokens:
                row_banned.extend(params.stop_token_ids)
                if not params.ignore_eos:
                    row_banned.extend(request.eos_token_ids)
            banned.append(row_banned)
            bias_ids.append(list(params.logit_bias))
            bias_values.append(list(params.logit_bias.values()))
            if params.logprobs is not None:
                num_logprobs = max(num_logprobs, params.logprobs)

        # One host-to-device transfer for every parameter.
        f32 = torch.float32
        on_device = host_arrays_to_device(
            [
                (temperatures, f32),
                (top_ps, f32),
                (min_ps, f32),
                (repetition, f32),
                (presence, f32),
                (frequency, f32),
                (top_ks, torch.int64),
            ],
            device,
        )
        greedy_flags = [t == 0 for t in temperatures]
        sampled_rows = [i for i, greedy in enumerate(greedy_flags) if not greedy]
        enabled_top_ks = [top_ks[i] for i in sampled_rows if top_ks[i] > 0]
        return cls(
            temperatures=on_device[0],
            top_ps=on_device[1],
            top_ks=on_device[6],
            min_ps=on_device[2],
            repetition_penalties=on_device[3],
            presence_penalties=on_device[4],
            frequency_penalties=on_device[5],
            generators=[request.generator for request in requests],
            prompt_token_ids=prompts,
            output_token_ids=outputs,
            counted_prompt_token_ids=counted_prompts,
            allowed_token_ids=allowed,
            eos_gain_token_ids=eos_gain_ids,
            eos_gains=eos_gains,
            banned_token_ids=banned,
            bias_token_ids=bias_ids,
            bias_values=bias_values,
            num_logprobs=num_logprobs,
            all_greedy=all(greedy_flags),
            any_greedy=any(greedy_flags),
            use_top_k=bool(enabled_top_ks),
            max_top_k=max(enabled_top_ks, default=0),
            use_top_p=any(top_ps[i] < 1.0 for i in sampled_rows),
            top_p_within_top_k=all(top_ks[i] > 0 for i in sampled_rows if top_ps[i] < 1.0),
            use_min_p=any(min_ps[i] > 0.0 for i in sampled_rows),
            use_repetition_penalty=any(r != 1.0 for r in repetition),
            use_presence_frequency_penalty=any(presence) or any(frequency),
            any_banned=any(banned),
            any_bias=any(bias_ids),
            any_allowed=any(allowed),
            any_eos_gain=any(eos_gain_ids),
        )


def eos_length_gain(params: SamplingParams, num_output_tokens: int) -> float:
    """The relative gain of the EOS logits under `exponential_decay_length_penalty` for a row
    whose output holds `num_output_tokens` tokens: factor^(n - start) - 1 past start, else 0."""
    if params.exponential_decay_length_penalty is None:
        return 0.0
    start, factor = params.exponential_decay_length_penalty
    if num_output_tokens <= start or factor == 1:
        return 0.0
    try:
        gain = factor ** (num_output_tokens - start) - 1.0
    except OverflowError:
        gain = MAX_EOS_DECAY_GAIN
    return min(gain, MAX_EOS_DECAY_GAIN)


def reads_output_tokens(params: SamplingParams) -> bool:
    """The row's penalties read the generated tokens themselves, not only how many there are."""
    repetition = _or(params.repetition_penalty, DEFAULT_REPETITION_PENALTY)
    return repetition != 1.0 or bool(params.presence_penalty or params.frequency_penalty)


def _or(value: float | int | None, fallback: float | int) -> float | int:
    return fallback if value is None else value
