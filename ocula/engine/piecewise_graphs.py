"""CUDA graphs of any batch of up to `max_tokens` new tokens, cut at every attention call.

Decode graphs (`cuda_graphs.DecodeGraphs`) need every sequence to compute exactly one token. The
other batches (a prompt's prefill, a follow-up question after a cached prefix, a prefill chunk
mixed with decodes) ran eagerly, and when they are short, launching their few hundred kernels from
Python takes longer than the GPU work: on an 8B model, ~14 ms of host time for ~4.5 ms of GPU time
at 64 tokens. Here the work between two attention calls is captured once per token-count bucket:
piece 0 is the embedding, the image splice and the first layer up to its attention; piece i the
rest of layer i-1 and layer i up to its attention; the last piece ends with the final norm.
Attention runs eagerly between the pieces with the real batch's host lists, so one bucket's
pieces serve every mix of sequences and lengths. Under tensor parallelism the collectives sit
inside the pieces; every rank captures the same buckets in the same order.

A batch of T tokens replays the bucket of the smallest size >= T. Rows T..size-1 are padding:
token 0 at position 0, K/V written to the scratch slot 0, and no sequence of the batch covers
them, so attention leaves their output rows as they were. Every other operation is row-wise, so
padding never reaches the real rows. Image embeddings go through a static splice buffer whose
unused entries hold row -1 (skipped by the splice kernel).

Capture swaps the backend of every `Attention` module for `PieceRecorder` (`piece_recorder`).
q and the attention output buffers are shared by all layers and buckets: replay runs on one
stream, each attention call reads its q before the next piece overwrites it.

A step of a single sequence replays a whole-step graph instead, attention included
(`whole_step_graphs`), captured here bucket by bucket beside the pieces, in the same pool.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable

import torch
from torch import nn

from ocula.engine.forward_batch import ForwardBatch
from ocula.engine.kv_pool import KVCachePool
from ocula.engine.piece_recorder import CapturedBucket, PieceRecorder
from ocula.engine.whole_step_graphs import WholeStepGraphs
from ocula.layers.attention import Attention, AttentionBackend
from ocula.utils.device import copy_padded_, replay_once

logger = logging.getLogger(__name__)


def token_count_buckets(max_tokens: int) -> list[int]:
    """16, 32, 48, 64, then every multiple of 32 up to the max (which is always included)."""
    sizes = [size for size in (16, 32, 48, 64) if size < max_tokens]
    size = 96
    while size < max_tokens:
        sizes.append(size)
        size += 32
    sizes.append(max_tokens)
    return sizes


class PiecewiseGraphs:
    def __init__(
        self,
        model: nn.Module,
        backend: AttentionBackend,
        kv_pool: KVCachePool,
        slot_table: torch.Tensor,
        padding_row: int,
        max_tokens: int,
        image_hidden_size: int | None,
        dtype: torch.dtype,
        gather_image_rows: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """`slot_table[padding_row]` must stay all zeros (the scratch slot), and `max_tokens` be
        at most the table's width. `image_hidden_size`: the width of spliced image embeddings
        (None for a model without images: no splice in the pieces); `gather_image_rows`: the
        image embedding pool's rows by index, for the whole-step graphs (`WholeStepGraphs`)."""
        self.model = model
        self.dtype = dtype
        self.backend = backend
        self.kv_pool = kv_pool
        self.slot_table = slot_table
        self.padding_row = padding_row
        self.buckets = token_count_buckets(max_tokens)
        self.max_tokens = self.buckets[-1]
        device = slot_table.device
        size = self.max_tokens
        self.input_ids = torch.zeros(size, dtype=torch.int64, device=device)
        self.positions = torch.zeros(size, dtype=torch.int64, device=device)
        self.out_slots = torch.zeros(size, dtype=torch.int64, device=device)
        self.spliced_rows: torch.Tensor | None = None
        self.spliced_embeds: torch.Tensor | None = None
        if image_hidden_size is not None:
            self.spliced_rows = torch.full((size,), -1, dtype=torch.int64, device=device)
            self.spliced_embeds = torch.zeros(size, image_hidden_size, dtype=dtype, device=device)
        # The capture batch's single sequence (kept: nothing captured may point at freed memory).
        self.capture_query_start_loc = torch.zeros(2, dtype=torch.int32, device=device)
        self.capture_seq_len = torch.zeros(1, dtype=torch.int32, device=device)
        self.capture_table_row = torch.full((1,), padding_row, dtype=torch.int64, device=device)
        self.attentions = [m for m in model.modules() if isinstance(m, Attention)]
        self.captured: dict[int, CapturedBucket] = {}
        self.whole_steps = WholeStepGraphs(
            model, backend, kv_pool, slot_table, padding_row, size, gather_image_rows
        )

    def _static_batch(self, size: int) -> ForwardBatch:
        """The bucket's batch at capture: one sequence of `size` new tokens in the padding row
        (the pieces capture no attention: its metadata here serves the warm-up forward)."""
        device = self.slot_table.device
        self.capture_query_start_loc[1] = size
        self.capture_seq_len.fill_(size)
        return ForwardBatch(
            input_ids=self.input_ids[:size],
            positions=self.positions[:size],
            query_start_loc=self.capture_query_start_loc,
            seq_lens=self.capture_seq_len,
            slot_table=self.slot_table,
            table_rows=self.capture_table_row,
            out_slots=self.out_slots[:size],
            logits_indices=torch.tensor([size - 1], dtype=torch.int64, device=device),
            kv_pool=self.kv_pool,
            query_lens_cpu=[size],
            seq_lens_cpu=[size],
            spliced_rows=None if self.spliced_rows is None else self.spliced_rows[:size],
            spliced_embeds=None if self.spliced_embeds is None else self.spliced_embeds[:size],
        )

    @torch.inference_mode()
    def capture(self, pool: tuple | None = None) -> None:
        """Captures every bucket, largest first, in one memory pool (`pool`: e.g. the decode
        graphs', which never replay at the same time). Collective under tensor parallelism."""
        recorder = PieceRecorder(pool)
        for attention in self.attentions:
            key = ((attention.num_heads, attention.head_dim), self.dtype)
            if key not in recorder.buffers:
                shape = (self.max_tokens, *key[0])
                device = self.slot_table.device
                recorder.buffers[key] = tuple(
                    torch.zeros(shape, dtype=key[1], device=device) for _ in range(2)
                )
        # The side stream torch.cuda.graph captured the decode graphs on: cuBLAS keeps a
        # workspace per stream for the process's life, so a stream of our own would add one.
        stream = torch.cuda.graph.default_capture_stream or torch.cuda.Stream(
            self.slot_table.device
        )
        for size in reversed(self.buckets):
            batch = self._static_batch(size)
            self.model(batch)  # warm-up: compiles the kernels, outside any capture
            torch.cuda.synchronize()
            recorder.pieces, recorder.calls = [], []
            self._swap_backends(recorder)
            try:
                with torch.cuda.stream(stream):
                    recorder.begin_piece()
                    hidden = self.model(batch)
                    recorder.end_piece()
            finally:
                recorder.close_open_piece()
                self._swap_backends(self.backend)
            self.captured[size] = CapturedBucket(recorder.pieces, recorder.calls, hidden)
            recorder.pool = self.whole_steps.capture(size, stream, recorder.pool, recorder.buffers)
        replay_once(
            [piece for bucket in self.captured.values() for piece in bucket.pieces]
            + [graph for graph, _ in self.whole_steps.graphs.values()]
        )
        logger.info(
            "piecewise CUDA graphs captured for batches of up to %d tokens (%d buckets), and "
            "whole-step graphs for single sequences",
            self.max_tokens,
            len(self.buckets),
        )

    def _swap_backends(self, backend: AttentionBackend | PieceRecorder) -> None:
        for attention in self.attentions:
            attention.backend = backend

    def can_run(self, batch: ForwardBatch) -> bool:
        return 0 < batch.num_tokens <= self.max_tokens

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Final hidden states [T, hidden] of the batch's T new tokens (see the module doc); the
        tensor lives in the graphs' shared pool, valid until any of these graphs replays again.
        A single sequence runs here too (in pieces) when the runner does not take it to
        `whole_steps` (a placeholder token among several new ones)."""
        count = batch.num_tokens
        size = next(bucket for bucket in self.buckets if bucket >= count)
        # Padding rows: token 0 at position 0 into the scratch slot, no image rows.
        copy_padded_(self.input_ids, batch.input_ids, size, 0)
        copy_padded_(self.positions, batch.positions, size, 0)
        copy_padded_(self.out_slots, batch.out_slots, size, 0)
        if self.spliced_rows is not None:
            copy_padded_(self.spliced_rows, batch.spliced_rows, size, -1)
            if batch.spliced_embeds is not None:
                self.spliced_embeds[: batch.spliced_embeds.shape[0]].copy_(batch.spliced_embeds)
        elif batch.spliced_rows is not None:
            raise ValueError("image embeddings in a batch of a model without images")
        bucket = self.captured[size]
        for piece, call in itertools.zip_longest(bucket.pieces, bucket.calls):
            piece.replay()
            if call is not None:
                self.backend.attend(
                    call.q,
                    call.k_cache,
                    call.v_cache,
                    batch,
                    call.scale,
                    call.sliding_window,
                    out=call.out,
                )
        return bucket.hidden[:count]
