"""Tensor parallelism end to end on CPU: N ranks compute what 1 rank computes.

Ranks run as threads of this process over `ThreadedGroup`, a stand-in for `ParallelGroup` whose
collectives meet at a barrier (fast, no process start). One case also runs over real gloo
process groups, to cover `ParallelGroup`'s own torch.distributed calls.
Covered: row-parallel all-reduce with the bias added once, vocab-parallel embedding and LM head
with a padded vocabulary (601 tokens), tied embeddings, KV heads split and replicated.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ocula.distributed.launch import leave_group
from ocula.distributed.parallel_group import ParallelGroup
from tests.helpers.forward import PagedRunner
from tests.models.conftest import PROMPTS, encode, load_ocula

NEW_TOKENS = 4
# Partial sums of the row-parallel matmuls are added in a different order than one matmul.
TOLERANCE = {"atol": 5e-5, "rtol": 1e-5}


class ThreadedGroup:
    """Duck-typed ParallelGroup for ranks that are threads of one process."""

    def __init__(self, rank: int, size: int, barrier: threading.Barrier, slots: list) -> None:
        self.rank, self.size = rank, size
        self._barrier, self._slots = barrier, slots

    def _exchange(self, x: torch.Tensor, combine: Callable[[list], torch.Tensor]) -> torch.Tensor:
        self._slots[self.rank] = x.clone()
        self._barrier.wait()
        result = combine(list(self._slots))
        self._barrier.wait()  # nobody overwrites a slot before every rank has read them all
        return result

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        total = self._exchange(x, lambda parts: torch.stack(parts).sum(0))
        return x.copy_(total)

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return self._exchange(x, lambda parts: torch.cat(parts, dim=dim))


def greedy_run(checkpoint: Path, tp: Any) -> tuple[list[list[int]], torch.Tensor]:
    model = load_ocula(checkpoint, tp=tp)
    runner = PagedRunner(model)
    all_tokens, all_logits = [], []
    for row, text in enumerate(PROMPTS[1:]):
        tokens, logits = runner.generate_greedy(row, encode(checkpoint, text), NEW_TOKENS)
        all_tokens.append(tokens)
        all_logits.append(logits)
    return all_tokens, torch.cat(all_logits)


CASES = [
    ("llama", 2, {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True}),
    ("qwen2", 2, {"num_key_value_heads": 4}),
    ("internlm2", 4, {"bias": True}),  # 2 KV heads over 4 ranks: each replicated twice
]


@pytest.mark.parametrize(("arch", "size", "overrides"), CASES)
def test_threaded_ranks_equal_single_rank(
    tiny_checkpoint: Any, arch: str, size: int, overrides: dict
) -> None:
    checkpoint = tiny_checkpoint(arch, **overrides)
    expected_tokens, expected_logits = greedy_run(checkpoint, ParallelGroup())
    barrier, slots = threading.Barrier(size), [None] * size
    groups = [ThreadedGroup(rank, size, barrier, slots) for rank in range(size)]
    with ThreadPoolExecutor(size) as pool:
        results = list(pool.map(lambda group: greedy_run(checkpoint, group), groups))
    for rank, (tokens, logits) in enumerate(results):
        assert tokens == expected_tokens, f"rank {rank}"
        torch.testing.assert_close(logits, expected_logits, **TOLERANCE)


def _gloo_rank(rank: int, size: int, checkpoint: Path, store: Path, out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=size)
    try:
        tokens, logits = greedy_run(checkpoint, ParallelGroup(rank, size, dist.group.WORLD))
        torch.save({"tokens": tokens, "logits": logits}, out / f"rank{rank}.pt")
    finally:
        leave_group()  # frees the group too: see there why


@pytest.mark.slow
def test_gloo_ranks_equal_single_rank(tiny_checkpoint: Any, tmp_path: Path) -> None:
    checkpoint = tiny_checkpoint("llama", attention_bias=True, tie_word_embeddings=True)
    expected_tokens, expected_logits = greedy_run(checkpoint, ParallelGroup())
    mp.spawn(_gloo_rank, args=(2, checkpoint, tmp_path / "store", tmp_path), nprocs=2)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["tokens"] == expected_tokens, f"rank {rank}"
        torch.testing.assert_close(result["logits"], expected_logits, **TOLERANCE)
