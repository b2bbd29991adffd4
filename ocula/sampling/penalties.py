"""Logit penalties and bans, applied in place to float32 logits [S, V] before sampling.

Token lists arrive as ragged per-row Python lists; each list kind becomes one flat index tensor
(one asynchronous host-to-device copy) and one scatter, whatever the batch size. Nothing here
reads a device tensor back to the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ocula.sampling.batch import host_to_device


def token_counts(
    vocab_size: int, device: torch.device, *ragged: Sequence[Sequence[int]]
) -> torch.Tensor:
    """counts[i, t] = how many times token t occurs in row i of the ragged lists (each of S
    rows); float32 [S, V].

    Ids >= V (an embedding table larger than the LM head) cannot be sampled and are not counted.
    """
    # One spare column absorbs the out-of-vocabulary ids without a data-dependent filter.
    counts = torch.zeros(len(ragged[0]), vocab_size + 1, dtype=torch.float32, device=device)
    positions = _flat_positions(vocab_size, device, *ragged)
    if positions is not None:
        ones = torch.ones(positions.shape, dtype=torch.float32, device=device)
        counts.view(-1).scatter_add_(0, positions, ones)
    return counts[:, :vocab_size]


def _presence(
    vocab_size: int, device: torch.device, *ragged: Sequence[Sequence[int]]
) -> torch.Tensor:
    """present[i, t] = token t occurs in row i of any of the ragged lists (each of S rows);
    bool [S, V]. Ids >= V are ignored."""
    present = torch.zeros(len(ragged[0]), vocab_size + 1, dtype=torch.bool, device=device)
    positions = _flat_positions(vocab_size, device, *ragged)
    if positions is not None:
        present.view(-1).scatter_(0, positions, True)
    return present[:, :vocab_size]


def apply_repetition_penalty(
    logits: torch.Tensor,
    prompt_token_ids: Sequence[Sequence[int]],
    output_token_ids: Sequence[Sequence[int]],
    penalties: torch.Tensor,
) -> None:
    """HF/CTRL repetition penalty over every token seen (in a row's prompt list, which is empty
    where only the output counts, or its output), once per token whatever its count: a positive
    logit is divided by the row's penalty, a negative one multiplied by it. Rows with penalty 1
    are unchanged.
    """
    seen = _presence(logits.shape[1], logits.device, prompt_token_ids, output_token_ids)
    penalty = penalties.unsqueeze(1)
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    torch.where(seen, penalized, logits, out=logits)


def apply_presence_frequency_penalties(
    logits: torch.Tensor,
    output_token_ids: Sequence[Sequence[int]],
    counted_prompt_token_ids: Sequence[Sequence[int]],
    presence_penalties: torch.Tensor,
    frequency_penalties: torch.Tensor,
) -> None:
    """OpenAI's penalties over the generated tokens (and the prompt's where a row's
    `counted_prompt_token_ids` holds it: LightLLM's `input_penalty`):
    logit[t] -= count[t] * frequency_penalty + (count[t] > 0) * presence_penalty.
    """
    counts = token_counts(
        logits.shape[1], logits.device, output_token_ids, counted_prompt_token_ids
    )
    logits -= counts * frequency_penalties.unsqueeze(1)
    logits -= (counts > 0).to(torch.float32) * presence_penalties.unsqueeze(1)


def apply_eos_length_gain(
    logits: torch.Tensor, eos_token_ids: Sequence[Sequence[int]], gains: Sequence[float]
) -> None:
    """logits[i, e] += |logits[i, e]| * gains[i] for every EOS id e of row i (ids >= V are
    ignored): transformers' exponential decay length penalty."""
    vocab_size = logits.shape[1]
    kept = [[e for e in ids if e < vocab_size] for ids in eos_token_ids]
    indices = _row_token_indices(logits.device, kept)
    if indices is not None:
        per_entry = [gain for ids, gain in zip(kept, gains, strict=True) for _ in ids]
        scale = host_to_device(per_entry, logits.dtype, logits.device)
        chosen = logits[indices]
        logits.index_put_(indices, chosen + chosen.abs() * scale)


def apply_allowed_tokens(logits: torch.Tensor, allowed_token_ids: Sequence[Sequence[int]]) -> None:
    """Sets logits[i, t] = -inf for every t outside a row's non-empty allowed list; rows with an
    empty list are unrestricted. Ids >= V are ignored; a row must allow one id below V."""
    vocab_size = logits.shape[1]
    allowed = _presence(vocab_size, logits.device, allowed_token_ids)
    restricted = host_to_device([bool(ids) for ids in allowed_token_ids], torch.bool, logits.device)
    logits.masked_fill_(restricted.unsqueeze(1) & ~allowed, float("-inf"))


def apply_bans(logits: torch.Tensor, banned_token_ids: Sequence[Sequence[int]]) -> None:
    """Sets logits[i, t] = -inf for every t in banned_token_ids[i] (ids >= V are ignored). A row
    must keep at least one finite logit (the caller bans EOS/stop ids, not the whole vocabulary).
    """
    vocab_size = logits.shape[1]
    in_vocab = [[t for t in ids if t < vocab_size] for ids in banned_token_ids]
    indices = _row_token_indices(logits.device, in_vocab)
    if indices is not None:
        # The fill value is made on the device (no blocking host-to-device copy of a scalar).
        logits.index_put_(indices, logits.new_full((), float("-inf")))


def apply_logit_bias(
    logits: torch.Tensor,
    bias_token_ids: Sequence[Sequence[int]],
    bias_values: Sequence[Sequence[float]],
) -> None:
    """logits[i, t] += bias for every (t, bias) of row i (distinct ids per row; ids >= V are
    ignored)."""
    vocab_size = logits.shape[1]
    kept = [
        [(t, b) for t, b in zip(ids, values, strict=True) if t < vocab_size]
        for ids, values in zip(bias_token_ids, bias_values, strict=True)
    ]
    indices = _row_token_indices(logits.device, [[t for t, _ in row] for row in kept])
    if indices is not None:
        values = host_to_device([b for row in kept for _, b in row], logits.dtype, logits.device)
        # Distinct (row, token) pairs: a gather, an add and a scatter, with no host sync.
        logits.index_put_(indices, logits[indices] + values)


def _flat_positions(
    vocab_size: int, device: torch.device, *ragged: Sequence[Sequence[int]]
) -> torch.Tensor | None:
    """Flat int64 indices row * (V + 1) + min(id, V) into a [S, V + 1] tensor for every entry of
    the ragged lists (column V is the spare one for ids >= V); None when all lists are empty."""
    indices = _row_token_indices(device, *ragged)
    if indices is None:
        return None
    rows, cols = indices
    return rows * (vocab_size + 1) + cols.clamp(max=vocab_size)


def _row_token_indices(
    device: torch.device, *ragged: Sequence[Sequence[int]]
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(row, token) int64 index tensors on `device` for every entry of the ragged lists (row i
    of each list is row i of the logits), in one asynchronous copy; None when all are empty."""
    rows: list[int] = []
    cols: list[int] = []
    for token_ids in ragged:
        for row, ids in enumerate(token_ids):
            rows.extend([row] * len(ids))
            cols.extend(ids)
    if not cols:
        return None
    flat = host_to_device([rows, cols], torch.int64, device)
    return flat[0], flat[1]
