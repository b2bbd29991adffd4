"""The batched sampler: float32 logits [S, V] plus a `SamplingBatch` -> one token per row.

Order of operations for every row (each step a batched tensor op over all rows):
1. logprobs: log-softmax of the *raw* model logits (before penalties, bans and temperature),
   read at the chosen token and at the top-k alternatives;
2. logit_bias (added), then the repetition penalty, then presence/frequency penalties, in
   vLLM's order, over the tokens the row's `penalty_scope` names; then the EOS logits' gain of
   `exponential_decay_length_penalty`;
3. the allowed-token mask, then bans (-inf), whatever the bias;
4. greedy rows (temperature 0) take the argmax here and ignore everything below;
5. temperature, top_k, top_p, min_p (in that order);
6. sampling by the exponential race: argmax(probs / E) with E ~ Exponential(1) per token, which
   picks token t with probability probs[t]. A seeded row draws its E from its own generator,
   every other row from the sampler's generator.

Nothing here reads a device tensor back to the host: which steps run is decided by the batch's
host-side flags, and per-row parameters stay tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ocula.sampling.batch import SamplingBatch
from ocula.sampling.penalties import (
    apply_allowed_tokens,
    apply_bans,
    apply_eos_length_gain,
    apply_logit_bias,
    apply_presence_frequency_penalties,
    apply_repetition_penalty,
)


@dataclass
class SamplerOutput:
    """One sampled token per row, on the logits' device."""

    token_ids: torch.Tensor  # [S] int64
    # [S] float32: log_softmax of the raw model logits (before penalties, bans, temperature and
    # filters) at token_ids. This is the model's own probability, as OpenAI and vLLM report it.
    logprobs: torch.Tensor
    # [S, k] with k = batch.num_logprobs, or None when k = 0: the k largest raw logprobs of each
    # row, sorted descending, and their token ids. A row that asked for fewer keeps a prefix.
    top_logprob_ids: torch.Tensor | None = None  # int64
    top_logprobs: torch.Tensor | None = None  # float32


class Sampler:
    """Stateless apart from the generator that unseeded rows draw from."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        # None: torch's default generator for the logits' device.
        self.generator = generator

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """Samples one token per row of `logits` ([S, V] float32; not modified)."""
        if logits.dim() != 2 or logits.shape[0] != batch.num_rows:
            raise ValueError(
                f"logits must be [S, V] with S = {batch.num_rows} rows, got {tuple(logits.shape)}"
            )
        logits = logits.float()
        log_normalizer = torch.logsumexp(logits, dim=-1)  # [S]

        if _needs_processing(batch):
            processed = logits.clone()
            _apply_penalties_and_bans(processed, batch)
            token_ids = self._choose_tokens(processed, batch)
        else:
            token_ids = logits.argmax(dim=-1)

        chosen_logits = logits.gather(1, token_ids.unsqueeze(1)).squeeze(1)
        output = SamplerOutput(token_ids=token_ids, logprobs=chosen_logits - log_normalizer)
        if batch.num_logprobs > 0:
            k = min(batch.num_logprobs, logits.shape[1])
            top_logits, top_ids = torch.topk(logits, k, dim=-1, sorted=True)
            output.top_logprob_ids = top_ids
            output.top_logprobs = top_logits - log_normalizer.unsqueeze(1)
        return output

    def _choose_tokens(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Token per row from penalized, banned logits (modified in place)."""
        if batch.all_greedy:
            return logits.argmax(dim=-1)
        greedy_ids = logits.argmax(dim=-1) if batch.any_greedy else None

        # Greedy rows run through the sampling math with temperature 1 (no division by zero);
        # their result is replaced by the argmax at the end.
        is_greedy = batch.temperatures == 0
        temperatures = torch.where(
            is_greedy, torch.ones_like(batch.temperatures), batch.temperatures
        )
        logits /= temperatures.unsqueeze(1)
        if batch.use_top_k or batch.use_top_p:
            _apply_top_k_top_p(logits, batch)
        if batch.use_min_p:
            _apply_min_p(logits, batch.min_ps)

        probs = torch.softmax(logits, dim=-1)
        sampled_ids = self._exponential_race(probs, batch.generators)
        if greedy_ids is None:
            return sampled_ids
        return torch.where(is_greedy, greedy_ids, sampled_ids)

    def _exponential_race(
        self, probs: torch.Tensor, generators: list[torch.Generator | None]
    ) -> torch.Tensor:
        """argmax(probs / E) per row, E ~ Exponential(1) i.i.d.: token t wins with prob probs[t].

        A seeded row draws exactly one [V] row from its own generator, so its result does not
        depend on its position in the batch or on the other rows.
        """
        draws = torch.empty_like(probs)
        seeded_rows = [row for row, generator in enumerate(generators) if generator is not None]
        if len(seeded_rows) < len(generators):
            draws.exponential_(generator=self.generator)
        for row in seeded_rows:
            draws[row].exponential_(generator=generators[row])
        # A zero draw would turn a zero-probability token into 0/0 = NaN.
        draws.clamp_min_(torch.finfo(draws.dtype).tiny)
        return (probs / draws).argmax(dim=-1)


def _needs_processing(batch: SamplingBatch) -> bool:
    """False exactly when every row is greedy and nothing alters the logits: plain argmax."""
    return not (
        batch.all_greedy
        and not batch.use_repetition_penalty
        and not batch.use_presence_frequency_penalty
        and not batch.any_banned
        and not batch.any_bias
        and not batch.any_allowed
        and not batch.any_eos_gain
    )


def _apply_penalties_and_bans(logits: torch.Tensor, batch: SamplingBatch) -> None:
    if batch.any_bias:  # first, as vLLM orders it: the penalties see the biased logits
        apply_logit_bias(logits, batch.bias_token_ids, batch.bias_values)
    if batch.use_repetition_penalty:
        apply_repetition_penalty(
            logits, batch.prompt_token_ids, batch.output_token_ids, batch.repetition_penalties
        )
    if batch.use_presence_frequency_penalty:
        apply_presence_frequency_penalties(
            logits,
            batch.output_token_ids,
            batch.counted_prompt_token_ids,
            batch.presence_penalties,
            batch.frequency_penalties,
        )
    if batch.any_eos_gain:  # after the penalties, as LightLLM applies it
        apply_eos_length_gain(logits, batch.eos_gain_token_ids, batch.eos_gains)
    if batch.any_allowed:
        apply_allowed_tokens(logits, batch.allowed_token_ids)
    if batch.any_banned:  # last: a banned token stays banned whatever its bias
        apply_bans(logits, batch.banned_token_ids)


def _apply_top_k_top_p(logits: torch.Tensor, batch: SamplingBatch) -> None:
    """Masks (-inf) tokens outside each row's top_k, then outside its top_p nucleus.

    top_k keeps every token whose logit is at least the k-th largest (ties at the boundary are
    all kept). top_p keeps the smallest prefix of the tokens sorted by probability whose mass
    reaches top_p; the most likely token is always kept.

    Only a row with top_p but no top_k needs the whole vocabulary sorted; otherwise a partial
    top-k of the max_top_k largest logits holds every token either filter can keep.
    """
    if batch.use_top_p and not batch.top_p_within_top_k:
        _apply_top_k_top_p_by_sorting(logits, batch)
        return
    vocab_size = logits.shape[1]
    top_ks = batch.top_ks.clamp(max=vocab_size)
    top_ks = torch.where(top_ks <= 0, torch.full_like(top_ks, vocab_size), top_ks)
    largest = torch.topk(logits, min(batch.max_top_k, vocab_size), dim=-1).values  # descending
    # Rows with top_k off (k = V > max_top_k) have threshold -inf.
    within = top_ks <= largest.shape[1]
    index = (top_ks.clamp(max=largest.shape[1]) - 1).unsqueeze(1)
    threshold = largest.gather(1, index)
    threshold = torch.where(within.unsqueeze(1), threshold, torch.full_like(threshold, -math.inf))
    if batch.use_top_p:
        # The sorting path's rule on the candidates only: a row with top_p < 1 has top_k here,
        # so every token it keeps is among them, and its least likely surviving candidate
        # becomes its threshold. Rows with top_p = 1 (top_k possibly off) keep their threshold.
        candidates = largest.masked_fill(largest < threshold, -math.inf)
        drop = _outside_nucleus(candidates, batch.top_ps)
        nucleus_floor = candidates.masked_fill(drop, math.inf).amin(dim=-1, keepdim=True)
        uses_top_p = (batch.top_ps < 1.0).unsqueeze(1)
        threshold = torch.where(uses_top_p, torch.maximum(threshold, nucleus_floor), threshold)
    logits.masked_fill_(logits < threshold, -math.inf)


def _apply_top_k_top_p_by_sorting(logits: torch.Tensor, batch: SamplingBatch) -> None:
    """`_apply_top_k_top_p` for batches where some row has top_p without top_k."""
    vocab_size = logits.shape[1]
    top_ks = batch.top_ks.clamp(max=vocab_size)
    top_ks = torch.where(top_ks <= 0, torch.full_like(top_ks, vocab_size), top_ks)
    sorted_logits, sorted_ids = torch.sort(logits, dim=-1, descending=True)
    if batch.use_top_k:
        threshold = sorted_logits.gather(1, (top_ks - 1).unsqueeze(1))
        sorted_logits.masked_fill_(sorted_logits < threshold, -math.inf)
    sorted_logits.masked_fill_(_outside_nucleus(sorted_logits, batch.top_ps), -math.inf)
    logits.scatter_(1, sorted_ids, sorted_logits)


def _outside_nucleus(sorted_logits: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    """bool mask over logits sorted descending per row: True past the smallest prefix whose
    probability mass reaches the row's top_p. Rows with top_p = 1 drop nothing (rounding in the
    cumulative sum must not drop their tail), and the most likely token is never dropped (a
    top_p that rounds to 0 in float32 keeps it alone)."""
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    top_ps = top_ps.unsqueeze(1)
    outside = (mass_before >= top_ps) & (top_ps < 1.0)
    outside[:, 0] = False
    return outside


def _apply_min_p(logits: torch.Tensor, min_ps: torch.Tensor) -> None:
    """Masks tokens whose probability is below min_p times the row's largest probability.

    In logit space: p_t < min_p * p_max  <=>  logit_t < logit_max + log(min_p); the softmax
    normalizer cancels, so earlier masking does not change the rule. min_p = 0 keeps all.
    """
    max_logits = logits.max(dim=-1, keepdim=True).values
    thresholds = max_logits + torch.log(min_ps).unsqueeze(1)  # log(0) = -inf: nothing masked
    logits.masked_fill_(logits < thresholds, -math.inf)
