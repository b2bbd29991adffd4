"""Whole-step CUDA graphs: the forward of one sequence, attention included, one graph per bucket.

A step of a single sequence (an idle server's prefill, a follow-up question after a cached
prefix, the last chunk of a long prompt) needs no eager attention between graph pieces
(`piecewise_graphs`, ~110 us of host time per layer for the eager launches and replays): its
bucket's whole-step graph holds the forward of one sequence of up to `size` new tokens. The
attention kernels read the sequence's query span, context length and slot-table row from static
device tensors, and their grid, sized at capture for the bucket's token count, covers any query
length up to it (blocks past the real length exit), so one graph is exact for every
single-sequence step of up to `size` tokens. Its attention writes into the pieces' shared output
buffer (`StaticOutputBackend`), so its padding rows too keep what earlier steps left there.

All static inputs live in one `StaticInputBlock`, which a step fills with one host-to-device
copy. The graph computes the rest itself: each new token's KV slot is read from the slot table
(`slot_table[token_rows, positions]`; padding rows use the table's padding row, all zeros, so
they write the scratch slot 0), and image embeddings are gathered from the embedding pool by
pool row (padding rows have splice row -1, which the splice skips).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ocula.engine.forward_batch import ForwardBatch
from ocula.engine.graph_inputs import InputField, StaticInputBlock
from ocula.engine.kv_pool import KVCachePool
from ocula.engine.piece_recorder import StaticOutputBackend
from ocula.layers.attention import Attention, AttentionBackend

# Host arrays of a step's image rows: (rows of the step's tokens, rows of the embedding pool).
ImageRows = tuple[np.ndarray, np.ndarray]


class WholeStepGraphs:
    def __init__(
        self,
        model: nn.Module,
        backend: AttentionBackend,
        kv_pool: KVCachePool,
        slot_table: torch.Tensor,
        padding_row: int,
        max_tokens: int,
        gather_image_rows: Callable[[torch.Tensor], torch.Tensor] | None,
    ) -> None:
        """`slot_table[padding_row]` must stay all zeros. `gather_image_rows(pool_rows)` (device
        int64) returns those rows of the image embedding pool; None for a model without images."""
        self.model = model
        self.backend = backend
        self.kv_pool = kv_pool
        self.slot_table = slot_table
        self.gather_image_rows = gather_image_rows
        int64, int32 = torch.int64, torch.int32
        fields = [
            InputField("input_ids", max_tokens, int64),
            InputField("positions", max_tokens, int64),
            InputField("token_rows", max_tokens, int64, pad=padding_row),
            InputField("query_start_loc", 2, int32),
            InputField("seq_len", 1, int32),
            InputField("table_row", 1, int64, pad=padding_row),
        ]
        if gather_image_rows is not None:
            fields.append(InputField("spliced_rows", max_tokens, int64, pad=-1))
            fields.append(InputField("image_sources", max_tokens, int64))
        self.inputs = StaticInputBlock(fields, slot_table.device)
        self.attentions = [m for m in model.modules() if isinstance(m, Attention)]
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.buckets: list[int] = []  # sizes captured, ascending

    def _batch(self, size: int) -> ForwardBatch:
        """The bucket's batch on the static inputs; inside a capture, the KV slots' lookup and
        the image rows' gather become part of the graph."""
        view = self.inputs.view
        positions = view("positions")[:size]
        spliced_rows = spliced_embeds = None
        if self.gather_image_rows is not None:
            spliced_rows = view("spliced_rows")[:size]
            spliced_embeds = self.gather_image_rows(view("image_sources")[:size])
        return ForwardBatch(
            input_ids=view("input_ids")[:size],
            positions=positions,
            query_start_loc=view("query_start_loc"),
            seq_lens=view("seq_len"),
            slot_table=self.slot_table,
            table_rows=view("table_row"),
            out_slots=self.slot_table[view("token_rows")[:size], positions],
            logits_indices=positions[:0],  # the forward does not read it
            kv_pool=self.kv_pool,
            query_lens_cpu=[size],
            seq_lens_cpu=[size],
            spliced_rows=spliced_rows,
            spliced_embeds=spliced_embeds,
        )

    def capture(
        self,
        size: int,
        stream: torch.cuda.Stream,
        pool: tuple | None,
        out_buffers: dict[tuple, tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple:
        """Captures the bucket's graph into `pool` on `stream`; returns the pool. Its attention
        writes into `out_buffers` (the pieces' static outputs). Collective under tensor
        parallelism, as every forward."""
        # Capture-time values: one sequence filling the bucket, in the padding row.
        self.inputs.stage({"query_start_loc": [0, size], "seq_len": [size]})
        self.model(self._batch(size))  # eager first: compiles what the graph's inputs need
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        self._swap_backends(StaticOutputBackend(self.backend, out_buffers))
        try:
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self.graphs[size] = (graph, self.model(self._batch(size)))
        finally:
            self._swap_backends(self.backend)
        self.buckets = sorted(self.graphs)
        return graph.pool()

    def _swap_backends(self, backend: AttentionBackend | StaticOutputBackend) -> None:
        for attention in self.attentions:
            attention.backend = backend

    def run(
        self,
        token_ids: Sequence[int],
        start: int,
        table_row: int,
        image_rows: ImageRows | None = None,
    ) -> torch.Tensor:
        """Final hidden states [T, hidden] of one sequence's T new tokens (positions start..),
        whose KV slots are in `slot_table[table_row]` (written before this call), with image
        embeddings at `image_rows`. A view into the graphs' pool, valid until they replay again."""
        count = len(token_ids)
        size = next(bucket for bucket in self.buckets if bucket >= count)
        if image_rows is not None and self.gather_image_rows is None:
            raise ValueError("image embeddings in a step of a model without images")
        self.inputs.stage(step_inputs(token_ids, start, table_row, image_rows))
        graph, hidden = self.graphs[size]
        graph.replay()
        return hidden[:count]


def step_inputs(
    token_ids: Sequence[int], start: int, table_row: int, image_rows: ImageRows | None
) -> dict[str, Sequence[int] | np.ndarray]:
    """The static inputs' values for one sequence's step (the rest of each field is padding)."""
    count = len(token_ids)
    values: dict[str, Sequence[int] | np.ndarray] = {
        "input_ids": token_ids,
        "positions": np.arange(start, start + count),
        "token_rows": np.full(count, table_row),
        "query_start_loc": [0, count],
        "seq_len": [start + count],
        "table_row": [table_row],
    }
    if image_rows is not None:
        values["spliced_rows"], values["image_sources"] = image_rows
    return values
