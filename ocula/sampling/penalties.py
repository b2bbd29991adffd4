"""Logit penalties and bans, applied in place to float32 logits [S, V] before sampling.

Token lists arrive as ragged per-row Python lists; each is turned into one flat (row, token)
index pair and scattered in a single tensor op, so the cost is one host-to-device copy per list
kind, whatever the batch size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def token_counts(
    token_ids: Sequence[Sequence[int]], vocab_size: int, device: torch.device
) -> torch.Tensor:
    """counts[i, t] = how many times token t occurs in token_ids[i]; float32 [S, V].

    Ids >= V (an embedding table larger than the LM head) cannot be sampled and are not counted.
    """
    rows, cols = _flat_indices(token_ids, device)
    # One spare column absorbs the out-of-vocabulary ids without a data-dependent filter.
    counts = torch.zeros(len(token_ids), vocab_size + 1, dtype=torch.float32, device=device)
    if cols.numel():
        ones = torch.ones_like(cols, dtype=torch.float32)
        counts.index_put_((rows, cols.clamp(max=vocab_size)), ones, accumulate=True)
    return counts[:, :vocab_size]


def apply_repetition_penalty(
    logits: torch.Tensor,
    prompt_token_ids: Sequence[Sequence[int]],
    output_token_ids: Sequence[Sequence[int]],
    penalties: torch.Tensor,
) -> None:
    """HF/CTRL repetition penalty over every token seen (prompt or output), once per token
    whatever its count: a positive logit is divided by the row's penalty, a negative one
    multiplied by it. Rows with penalty 1 are unchanged.
    """
    vocab_size = logits.shape[1]
    seen = token_counts(prompt_token_ids, vocab_size, logits.device) > 0
    seen |= token_counts(output_token_ids, vocab_size, logits.device) > 0
    penalty = penalties.unsqueeze(1)
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    torch.where(seen, penalized, logits, out=logits)


def apply_presence_frequency_penalties(
    logits: torch.Tensor,
    output_token_ids: Sequence[Sequence[int]],
    presence_penalties: torch.Tensor,
    frequency_penalties: torch.Tensor,
) -> None:
    """OpenAI's penalties over the generated tokens only:
    logit[t] -= count[t] * frequency_penalty + (count[t] > 0) * presence_penalty.
    """
    counts = token_counts(output_token_ids, logits.shape[1], logits.device)
    logits -= counts * frequency_penalties.unsqueeze(1)
    logits -= (counts > 0).to(torch.float32) * presence_penalties.unsqueeze(1)


def apply_bans(logits: torch.Tensor, banned_token_ids: Sequence[Sequence[int]]) -> None:
    """Sets logits[i, t] = -inf for every t in banned_token_ids[i] (ids >= V are ignored). A row
    must keep at least one finite logit (the caller bans EOS/stop ids, not the whole vocabulary).
    """
    vocab_size = logits.shape[1]
    in_vocab = [[t for t in ids if t < vocab_size] for ids in banned_token_ids]
    rows, cols = _flat_indices(in_vocab, logits.device)
    if cols.numel():
        logits.index_put_((rows, cols), torch.tensor(float("-inf"), device=logits.device))


def _flat_indices(
    token_ids: Sequence[Sequence[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token) int64 index tensors on `device` for every entry of the ragged lists."""
    rows: list[int] = []
    cols: list[int] = []
    for row, ids in enumerate(token_ids):
        rows.extend([row] * len(ids))
        cols.extend(ids)
    flat = torch.tensor([rows, cols], dtype=torch.int64).to(device, non_blocking=True)
    return flat[0], flat[1]
