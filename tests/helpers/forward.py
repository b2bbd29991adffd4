"""Driving a model through a real KVCachePool without the engine.

`PagedRunner` keeps sequences in rows of a slot table and builds one `ForwardBatch` per `step`.
Slots of row r, position j are `1 + j * max_seqs + r`: interleaved across sequences (so a bug
that reads a neighbour's slots shows up) and never the scratch slot 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ocula.engine.forward_batch import ForwardBatch
from ocula.engine.kv_pool import KVCachePool


class PagedRunner:
    def __init__(
        self,
        model: nn.Module,
        max_seqs: int = 8,
        max_len: int = 128,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.model = model
        self.max_seqs = max_seqs
        self.max_len = max_len
        self.device = torch.device(device)
        num_layers, num_kv_heads, head_dim = model.kv_cache_shape()
        self.pool = KVCachePool(
            num_layers, max_seqs * max_len, num_kv_heads, head_dim, dtype, self.device
        )
        rows = torch.arange(max_seqs)[:, None]
        positions = torch.arange(max_len)[None, :]
        self.slot_table = (1 + positions * max_seqs + rows).to(torch.int32).to(self.device)
        self.lengths = [0] * max_seqs  # tokens of each row already in the pool

    def reset(self, row: int) -> None:
        self.lengths[row] = 0

    def build_batch(
        self, chunks: Sequence[tuple[int, Sequence[int]]], all_logits: bool = False
    ) -> ForwardBatch:
        """A batch where sequence `row` appends `token_ids` after its cached tokens.

        Logits rows: the last new token of each sequence, or every new token if `all_logits`.
        """
        input_ids, positions, out_slots, logits_rows = [], [], [], []
        query_lens, seq_lens, table_rows = [], [], []
        for row, token_ids in chunks:
            cached = self.lengths[row]
            new = len(token_ids)
            if new == 0 or cached + new > self.max_len:
                raise ValueError(f"row {row}: cannot append {new} tokens after {cached}")
            start = len(input_ids)
            input_ids.extend(token_ids)
            positions.extend(range(cached, cached + new))
            out_slots.extend(self.slot_table[row, cached : cached + new].tolist())
            logits_rows.extend(range(start, start + new) if all_logits else [start + new - 1])
            query_lens.append(new)
            seq_lens.append(cached + new)
            table_rows.append(row)
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)

        def tensor(values: list[int], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=self.device)

        return ForwardBatch(
            input_ids=tensor(input_ids, torch.int64),
            positions=tensor(positions, torch.int64),
            query_start_loc=tensor(starts, torch.int32),
            seq_lens=tensor(seq_lens, torch.int32),
            slot_table=self.slot_table,
            table_rows=tensor(table_rows, torch.int64),
            out_slots=tensor(out_slots, torch.int64),
            logits_indices=tensor(logits_rows, torch.int64),
            kv_pool=self.pool,
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
        )

    @torch.no_grad()
    def step(
        self, chunks: Sequence[tuple[int, Sequence[int]]], all_logits: bool = False
    ) -> torch.Tensor:
        """Runs one forward; returns float32 logits [S, vocab] (see `build_batch` for S)."""
        batch = self.build_batch(chunks, all_logits)
        hidden = self.model(batch)
        logits = self.model.compute_logits(hidden[batch.logits_indices])
        for row, token_ids in chunks:
            self.lengths[row] += len(token_ids)
        return logits

    def generate_greedy(
        self, row: int, prompt_ids: Sequence[int], max_new_tokens: int, cached_prefix: int = 0
    ) -> tuple[list[int], torch.Tensor]:
        """Greedy continuation of `prompt_ids` in `row` (which must be empty).

        With `cached_prefix` > 0 the first `cached_prefix` prompt tokens are prefilled in a step of
        their own, so the rest of the prompt runs as a prefill after a cached prefix.
        Returns (new token ids, float32 logits [max_new_tokens, vocab] that chose them).
        """
        if self.lengths[row] != 0:
            raise ValueError(f"row {row} is not empty")
        prompt_ids = list(prompt_ids)
        if cached_prefix:
            self.step([(row, prompt_ids[:cached_prefix])])
        logits = [self.step([(row, prompt_ids[cached_prefix:])])[0]]
        tokens = [int(logits[-1].argmax())]
        while len(tokens) < max_new_tokens:
            logits.append(self.step([(row, [tokens[-1]])])[0])
            tokens.append(int(logits[-1].argmax()))
        return tokens, torch.stack(logits)
