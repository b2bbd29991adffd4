"""`TritonBackend.compile_decode_splits`: every decode split count compiled before serving, so
that a step mixing prefills with decodes never compiles the decode kernel inside itself."""

from __future__ import annotations

import pytest
import torch

from ocula.attention.triton_backend import TritonBackend
from ocula.layers.attention import Attention
from tests.kernels.test_paged_attention import (  # noqa: F401 (an autouse fixture)
    interpreter_runtime_loop_bounds,
    make_batch,
)

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16
BOUND = 1 << 14  # as the graph runner fixes it: splits then follow the number of sequences


def layers(backend: TritonBackend) -> list[Attention]:
    scale = HEAD_DIM**-0.5
    return [
        Attention(HEADS, KV_HEADS, HEAD_DIM, scale, 0, None, backend),
        Attention(HEADS, KV_HEADS, HEAD_DIM, scale, 1, None, backend),
        Attention(HEADS, KV_HEADS, HEAD_DIM, scale, 2, 8, backend),  # a sliding-window layer
    ]


def mixed(num_seqs: int) -> list[tuple[int, int]]:
    """One prefill chunk, then decodes: the step the warm-up is for."""
    return [(3, 4)] + [(2 + i % 5, 1) for i in range(num_seqs - 1)]


def test_compile_decode_splits_reads_only(device: torch.device) -> None:
    backend = TritonBackend(decode_context_bound=BOUND)
    _, batch = make_batch(mixed(3), HEADS, KV_HEADS, HEAD_DIM, torch.float16, device, seed=3)
    k_cache, v_cache = batch.kv_pool.layer(0)
    before = [t.clone() for t in (k_cache, v_cache, batch.slot_table)]
    padding_row = batch.slot_table.shape[0] - 1
    shapes = backend.compile_decode_splits(
        layers(backend), k_cache, v_cache, batch.slot_table, padding_row
    )
    assert shapes == 2  # the windowed layer is another kernel
    for tensor, copy in zip((k_cache, v_cache, batch.slot_table), before, strict=True):
        assert torch.equal(tensor, copy)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts compiles on the GPU")
def test_no_compile_in_a_mixed_step_after_the_warmup(device: torch.device) -> None:
    from triton import knobs

    backend = TritonBackend(decode_context_bound=BOUND)
    compiled: list[str] = []

    def record(*, repr: str, **_: object) -> bool:
        compiled.append(repr)
        return False  # compile as usual

    # 5 ... 129 sequences take every split count from 32 down to 1 with 2 KV heads.
    for num_seqs in (5, 9, 17, 33, 65, 129):
        q, batch = make_batch(mixed(num_seqs), HEADS, KV_HEADS, HEAD_DIM, torch.bfloat16, device)
        k_cache, v_cache = batch.kv_pool.layer(0)
        padding_row = batch.slot_table.shape[0] - 1
        backend.compile_decode_splits(
            layers(backend), k_cache, v_cache, batch.slot_table, padding_row
        )
        previous = knobs.runtime.jit_cache_hook
        knobs.runtime.jit_cache_hook = record
        try:
            backend.attend(q, k_cache, v_cache, batch, HEAD_DIM**-0.5, None)
        finally:
            knobs.runtime.jit_cache_hook = previous
        assert not [name for name in compiled if "decode" in name], (num_seqs, compiled)
