"""Writing one request's chunk into a step plan: the request's new slots and counters, the
slot-table writes and the `ScheduledSequence` the runner computes.

After the call the request's slots for the chunk's tokens are recorded and
`num_scheduled_tokens` covers them; a chunk that reaches the end of the known tokens samples the
next one, whose place `token_ids` holds with PLACEHOLDER_TOKEN until the step's result is
applied (the next plan may decode it before then).
"""

from __future__ import annotations

import time

import torch

from ocula.engine.image_inputs import ImageScheduler
from ocula.engine.request import PLACEHOLDER_TOKEN, Request
from ocula.engine.step_plan import NewRequestData, ScheduledSequence, StepPlan


def plan_chunk(plan: StepPlan, request: Request, slots: torch.Tensor) -> None:
    """Tokens [num_scheduled_tokens, + len(slots)) of `request`, into `slots`."""
    start = request.num_scheduled_tokens
    end = start + len(slots)
    request.put_new_slots(start, slots)
    request.num_scheduled_tokens = end
    plan.table_writes.add(request.table_row, start, slots)
    _add_sequence(plan, request, start, end)


def plan_decode(plan: StepPlan, request: Request, slot: int) -> None:
    """`plan_chunk` for the request's one remaining token, with its slot as an int (a decode
    step does this for every running request, so it stays free of tensor operations)."""
    start = request.num_scheduled_tokens
    request.put_new_slot(start, slot)
    request.num_scheduled_tokens = start + 1
    plan.table_writes.add_cell(request.table_row, start, slot)
    _add_sequence(plan, request, start, start + 1)


def plan_first_admission(plan: StepPlan, request: Request, prefix_len: int) -> None:
    """A request admitted for the first time (not after a preemption): the runner learns its
    sampling parameters and prompt with this plan."""
    request.num_cached_tokens = prefix_len
    plan.new_requests.append(
        NewRequestData(
            request.request_id,
            request.sampling_params,
            request.token_ids[: request.num_prompt_tokens],
            request.eos_token_ids,
        )
    )
    request.first_scheduled_time = time.monotonic()


def _add_sequence(plan: StepPlan, request: Request, start: int, end: int) -> None:
    samples = end == request.num_tokens
    plan.sequences.append(
        ScheduledSequence(
            request.request_id,
            request.table_row,
            start,
            request.token_ids[start:end],
            samples=samples,
            image_slices=ImageScheduler.slices(request, start, end) if request.images else [],
            request_serial=request.serial,
            prompt_logprob_targets=request.prompt_logprob_targets(start, end),
        )
    )
    if samples:
        request.token_ids.append(PLACEHOLDER_TOKEN)


def is_decode(request: Request) -> bool:
    """One token left to compute: the request decodes."""
    return request.num_tokens - request.num_scheduled_tokens == 1


def chunk_size(request: Request, budget: int, chunked_prefill_size: int | None) -> int:
    """Tokens of the request's next chunk within `budget`; 0 when whole prompts only
    (`chunked_prefill_size` None) and the rest does not fit."""
    remaining = request.num_tokens - request.num_scheduled_tokens
    if chunked_prefill_size is None:
        return remaining if remaining <= budget else 0
    return min(remaining, budget, chunked_prefill_size)


def last_token_in_flight(request: Request, max_req_total_len: int) -> bool:
    """A step in flight samples this request's last token: the length limits end it there."""
    last = request.num_tokens - 1
    return (
        request.token_ids[last] == PLACEHOLDER_TOKEN
        and request.length_stop(last, max_req_total_len) is not None
    )
