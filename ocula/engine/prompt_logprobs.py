"""Prompt logprobs: the model's log-probability of each prompt token given the ones before it,
computed from the hidden states of the prefill chunks that cover the prompt.

A plan's sequence names the prompt tokens its first positions predict
(`ScheduledSequence.prompt_logprob_targets`: position p predicts token p + 1). Their hidden
rows go through the LM head in slices of PROMPT_LOGPROB_ROWS (a slice's logits are rows x
vocabulary floats, so a long prompt never holds all of them at once), then through a float32
log-softmax. The LM head is a collective under tensor parallelism: every rank runs it on the
same rows, and rank 0 alone keeps the results. Reading them back to the host makes the step wait
for the device; only steps of requests that asked for prompt logprobs pay it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from ocula.engine.outputs import TokenLogprob
from ocula.engine.step_plan import StepPlan

# Rows per LM-head slice: 64 rows of a 152k vocabulary take ~90 MB (float32 logits, their
# log-softmax and a comparison mask), allocated after the step's forward has freed its
# activations, whose peak the memory budget reserves and which is far larger.
PROMPT_LOGPROB_ROWS = 64


def plan_wants_prompt_logprobs(plan: StepPlan) -> bool:
    return any(seq.prompt_logprob_targets for seq in plan.sequences)


@torch.inference_mode()
def compute_prompt_logprobs(
    plan: StepPlan,
    hidden: torch.Tensor,
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
    alternatives: Mapping[str, int] | None,
) -> dict[str, tuple[int, list[TokenLogprob]]]:
    """For each sequence of `plan` with targets: (the position of its first target, a
    TokenLogprob per target, with its rank and the `alternatives[request_id]` most likely
    tokens). `hidden` holds the plan's rows in order. `alternatives` is None on the ranks that
    only take part in the LM head's collective; they get {}."""
    rows: list[int] = []
    targets: list[int] = []
    owners: list[tuple[str, int, int]] = []  # request id, first target position, count
    base = 0
    for seq in plan.sequences:
        wanted = seq.prompt_logprob_targets
        if wanted:
            rows.extend(range(base, base + len(wanted)))
            targets.extend(wanted)
            owners.append((seq.request_id, seq.start + 1, len(wanted)))
        base += seq.num_new_tokens
    if not rows:
        return {}
    device = hidden.device
    row_index = torch.tensor(rows, dtype=torch.int64, device=device)
    target_index = torch.tensor(targets, dtype=torch.int64, device=device)
    k = max((alternatives or {}).get(owner[0], 0) for owner in owners)
    chosen: list[float] = []
    ranks: list[int] = []
    top_ids: list[list[int]] = []
    top_values: list[list[float]] = []
    for first in range(0, len(rows), PROMPT_LOGPROB_ROWS):
        piece = slice(first, first + PROMPT_LOGPROB_ROWS)
        logits = compute_logits(hidden[row_index[piece]])  # collective
        if alternatives is None:
            continue
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        picked = logprobs.gather(1, target_index[piece].unsqueeze(1))
        ranks += ((logprobs > picked).sum(dim=-1) + 1).tolist()
        chosen += picked.squeeze(1).tolist()
        if k > 0:
            values, ids = logprobs.topk(min(k, logprobs.shape[1]), dim=-1)
            top_ids += ids.tolist()
            top_values += values.tolist()
    if alternatives is None:
        return {}
    results: dict[str, tuple[int, list[TokenLogprob]]] = {}
    offset = 0
    for request_id, first_position, count in owners:
        wanted_k = alternatives.get(request_id, 0)
        entries = []
        for i in range(offset, offset + count):
            top = []
            if wanted_k:
                top = list(zip(top_ids[i][:wanted_k], top_values[i][:wanted_k], strict=True))
            entries.append(TokenLogprob(targets[i], chosen[i], top, rank=ranks[i]))
        results[request_id] = (first_position, entries)
        offset += count
    return results
