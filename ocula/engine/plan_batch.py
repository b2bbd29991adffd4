"""The step plan's batch turned into the device tensors of a `ForwardBatch`."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from ocula.engine.forward_batch import ForwardBatch
from ocula.engine.kv_pool import KVCachePool
from ocula.engine.request import PLACEHOLDER_TOKEN
from ocula.engine.step_plan import StepPlan
from ocula.utils.device import host_arrays_to_device


def build_forward_batch(
    plan: StepPlan,
    device: torch.device,
    slot_table: torch.Tensor,
    kv_pool: KVCachePool,
    last_tokens: torch.Tensor,
    spliced_embeddings: Callable[[StepPlan, list[int]], tuple[torch.Tensor, torch.Tensor] | None],
) -> ForwardBatch:
    """The plan's batch as device tensors, in one host-to-device copy. A token sampled by the
    step before and not yet on the host (PLACEHOLDER_TOKEN) is read from `last_tokens` (per
    slot-table row) on the device; `spliced_embeddings(plan, query_starts)` gives the rows whose
    embeddings come from images, and those embeddings."""
    query_lens = [s.num_new_tokens for s in plan.sequences]
    seq_lens = [s.start + s.num_new_tokens for s in plan.sequences]
    token_ids: list[int] = []
    positions: list[int] = []
    token_rows: list[int] = []
    for seq in plan.sequences:
        token_ids.extend(seq.token_ids)
        positions.extend(range(seq.start, seq.start + seq.num_new_tokens))
        token_rows.extend([seq.table_row] * seq.num_new_tokens)
    query_starts = [0, *itertools.accumulate(query_lens)]
    sampling_ends = [query_starts[i + 1] - 1 for i, s in enumerate(plan.sequences) if s.samples]
    spliced = spliced_embeddings(plan, query_starts)
    int64, int32 = torch.int64, torch.int32
    (
        input_ids,
        positions_dev,
        token_rows_dev,
        table_rows,
        logits_indices,
        query_start_loc,
        seq_lens_dev,
    ) = host_arrays_to_device(
        [
            (token_ids, int64),
            (positions, int64),
            (token_rows, int64),
            ([s.table_row for s in plan.sequences], int64),
            (sampling_ends, int64),
            (query_starts, int32),
            (seq_lens, int32),
        ],
        device,
    )
    if any(s.token_ids[-1] == PLACEHOLDER_TOKEN for s in plan.sequences):
        # Tokens sampled by the step before, not yet on the host: read on the device.
        input_ids = torch.where(input_ids < 0, last_tokens[token_rows_dev], input_ids)
    return ForwardBatch(
        input_ids=input_ids,
        positions=positions_dev,
        query_start_loc=query_start_loc,
        seq_lens=seq_lens_dev,
        slot_table=slot_table,
        table_rows=table_rows,
        out_slots=slot_table[token_rows_dev, positions_dev],
        logits_indices=logits_indices,
        kv_pool=kv_pool,
        query_lens_cpu=query_lens,
        seq_lens_cpu=seq_lens,
        spliced_rows=spliced[0] if spliced else None,
        spliced_embeds=spliced[1] if spliced else None,
    )
