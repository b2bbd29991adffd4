"""What one model forward needs to know about the batch it runs (the scheduler->runner plan,
turned into device tensors by the model runner).

A batch is a list of sequences laid end to end ("varlen"): sequence b contributes
`query_lens[b]` new tokens (a prefill chunk, or 1 for a decode) whose K/V are appended after
`seq_lens[b] - query_lens[b]` tokens already in the KV pool. Prefill chunks and decodes mix
freely in one batch. The object is passed down to every layer explicitly: there is no global
forward context.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ocula.engine.kv_pool import KVCachePool


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64: the new tokens of every sequence, concatenated
    positions: torch.Tensor  # [T] int64: position of each new token inside its sequence
    query_start_loc: torch.Tensor  # [B + 1] int32: sequence b's new tokens are rows [s[b], s[b+1])
    seq_lens: torch.Tensor  # [B] int32: context length of each sequence after this step
    slot_table: torch.Tensor  # [rows, max_len] int32: slot of token j of the request in row r
    table_rows: torch.Tensor  # [B] int64: row of `slot_table` that holds sequence b
    out_slots: torch.Tensor  # [T] int64: slot that receives each new token's K and V
    logits_indices: torch.Tensor  # [S] int64: rows of the hidden states to compute logits for
    kv_pool: KVCachePool
    # Host copies of the per-sequence lengths: the reference path loops over sequences and must
    # not read device tensors back (a sync per layer on GPU).
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    # Multimodal: when set, replaces the token embeddings of the rows in `spliced_rows` ([E]).
    spliced_embeds: torch.Tensor | None = None  # [E, hidden]
    spliced_rows: torch.Tensor | None = None  # [E] int64; a negative row skips its embedding

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @functools.cached_property
    def decode_only(self) -> bool:
        """Whether every sequence has exactly one new token (host values only)."""
        return all(n == 1 for n in self.query_lens_cpu)

    def context_slots(self, b: int) -> torch.Tensor:
        """Slots of the whole context of sequence b (cached prefix plus this step's tokens)."""
        return self.slot_table[self.table_rows[b], : self.seq_lens_cpu[b]]
