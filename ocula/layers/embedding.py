"""Vocabulary-parallel token embedding and LM head.

The table is padded with zero rows to tp * n rows, n = ceil(vocab_size / tp) rounded up to a
multiple of VOCAB_PAD_ROWS, and rank r holds rows [r*n, (r+1)*n). Token ids (< vocab_size) fill
the table from row 0, so every padding row comes after the last real one (the last ranks may hold
only padding): padding is never looked up, and the LM head trims its logits away with one
slice. The padding keeps each rank's logits row a multiple of 16 bytes: with a vocabulary like
Qwen2's 151,674 ids cuBLAS otherwise falls back to a GEMV that reads the LM head at ~75% of the
bandwidth its aligned kernels reach.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ocula.distributed.parallel_group import SINGLE_RANK, ParallelGroup
from ocula.layers.linear import CheckpointTensor, ShardId, copy_into, linear, narrow_checkpoint

VOCAB_PAD_ROWS = 64


def padded_rows_per_rank(num_embeddings: int, tp_size: int) -> int:
    """Rows of the table each rank holds: its share of the vocabulary, padded to VOCAB_PAD_ROWS."""
    share = -(-num_embeddings // tp_size)
    return -(-share // VOCAB_PAD_ROWS) * VOCAB_PAD_ROWS


class VocabParallelEmbedding(nn.Module):
    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        tp: ParallelGroup = SINGLE_RANK,
        shared_weight: nn.Parameter | None = None,
    ) -> None:
        super().__init__()
        self.tp = tp
        self.num_embeddings = num_embeddings
        self.rows_per_rank = padded_rows_per_rank(num_embeddings, tp.size)
        self.vocab_start = tp.rank * self.rows_per_rank
        # Rows of this rank that hold real tokens (the last ranks may hold only padding).
        self.real_rows = max(0, min(self.rows_per_rank, num_embeddings - self.vocab_start))
        if shared_weight is not None:
            if tuple(shared_weight.shape) != (self.rows_per_rank, embedding_dim):
                raise ValueError("a shared weight needs the same vocabulary size and sharding")
            # The same Parameter object: loaded once (by its owner), listed once.
            self.weight = shared_weight
            return
        self.weight = nn.Parameter(
            torch.empty(self.rows_per_rank, embedding_dim), requires_grad=False
        )
        self.weight.weight_loader = self.weight_loader

    def weight_loader(
        self, param: nn.Parameter, loaded: CheckpointTensor, shard_id: ShardId = None
    ) -> None:
        param.data[self.real_rows :].zero_()
        if self.real_rows:
            piece = narrow_checkpoint(loaded, 0, self.vocab_start, self.real_rows)
            copy_into(param.data[: self.real_rows], piece)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local_ids = input_ids - self.vocab_start
        outside = (local_ids < 0) | (local_ids >= self.rows_per_rank)
        embeds = F.embedding(local_ids.masked_fill(outside, 0), self.weight)
        embeds = embeds.masked_fill(outside.unsqueeze(-1), 0.0)
        return self.tp.all_reduce(embeds)


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection sharded like the embedding; `tie_to` shares the embedding's weight."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        tp: ParallelGroup = SINGLE_RANK,
        tie_to: VocabParallelEmbedding | None = None,
    ) -> None:
        shared = tie_to.weight if tie_to is not None else None
        super().__init__(num_embeddings, embedding_dim, tp, shared_weight=shared)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [S, embedding_dim] -> float32 logits [S, num_embeddings] on every rank.

        The matmul runs in the weight dtype (as transformers does), the cast to float32 after.
        """
        logits = linear(hidden, self.weight)
        logits = self.tp.all_gather(logits, dim=-1)
        return logits[:, : self.num_embeddings].float()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.compute_logits(hidden)
