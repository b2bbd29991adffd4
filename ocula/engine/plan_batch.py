"""The step plan's batch turned into the device tensors of a `ForwardBatch`."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from ocula.engine.forward_batch import ForwardBatch
from ocula.engine.kv_pool import KVCachePool
from ocula.engine.request import PLACEHOLDER_TOKEN
from ocula.engine.step_plan import StepPlan
from ocula.utils.device import host_arrays_to_device, to_device_async


def write_slot_table(slot_table: torch.Tensor, writes: torch.Tensor | None) -> None:
    """Applies a plan's `SlotTableWrites.flatten()` ([3, cells] int64 CPU: row, column, slot;
    None for none) to the device's slot table, in one transfer. (Staging the three rows apart
    with the slots as int32 saves the cast's launch but took more host time: ~3,300 cells, on
    an H100 host, 0.41 ms against 0.23 ms for `flatten` and this function together.)"""
    if writes is None:
        return
    rows, cols, slots = to_device_async(writes, slot_table.device)
    slot_table[rows, cols] = slots.to(slot_table.dtype)


def image_rows(
    plan: StepPlan,
    query_starts: list[int],
    image_pages: dict[str, torch.Tensor],
    pool_rows: Callable[[torch.Tensor, int, int], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rows of the batch, rows of the image embedding pool) of every image embedding row the
    plan splices in, CPU int64; None when it splices none. Sequence b's rows start at
    `query_starts[b]`; `pool_rows(pages, start, end)` maps an embedding's rows to pool rows
    (`EmbeddingPool.row_indices`), `image_pages` is each cached image's pages by key."""
    rows: list[torch.Tensor] = []
    sources: list[torch.Tensor] = []
    for seq, base in zip(plan.sequences, query_starts, strict=False):
        for piece in seq.image_slices:
            first = base + piece.dst_start
            rows.append(torch.arange(first, first + piece.src_end - piece.src_start))
            sources.append(pool_rows(image_pages[piece.key], piece.src_start, piece.src_end))
    if not rows:
        return None
    return torch.cat(rows), torch.cat(sources)


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
