"""The prefill kernel's launch for short chunks (16-bit inputs: 16-query blocks over 128 keys up
to SHORT_CHUNK_QUERIES new tokens, 64 x 128 up to WIDE_KEY_QUERIES) against
`paged_attention_reference`: follow-up questions over cached prefixes longer than a key block, a
short fresh prompt, decode rows beside them, with and without a sliding window, through the
launch's own block sizes."""

from __future__ import annotations

import itertools

import pytest
import torch

import ocula.kernels.prefill_attention as prefill_attention_module
from ocula.kernels.prefill_attention import (
    SHORT_CHUNK_QUERIES,
    WIDE_KEY_QUERIES,
    _launch_config,
)
from tests.kernels.test_paged_attention import (  # noqa: F401 (an autouse fixture)
    assert_close,
    dtypes,
    interpreter_runtime_loop_bounds,
    make_batch,
    reference,
    run_prefill,
)

# Cached prefixes of 1-3 key blocks and a partial one, a fresh prompt, a decode row; then the
# same with a chunk of more than SHORT_CHUNK_QUERIES new tokens (64 x 128 blocks).
SHORT = [(300, 40), (131, 9), (0, 33), (250, 1)]
WIDER = [(200, 150), (0, 140), (77, 20), (250, 1)]


def test_short_chunks_take_narrow_query_blocks_over_wide_key_blocks() -> None:
    assert _launch_config(SHORT_CHUNK_QUERIES, 128, 2)[:2] == (16, 128)
    assert _launch_config(16, 64, 2)[:2] == (16, 128)
    assert _launch_config(SHORT_CHUNK_QUERIES + 1, 128, 2)[:2] == (64, 128)
    assert _launch_config(WIDE_KEY_QUERIES, 128, 2)[:2] == (64, 128)
    assert _launch_config(WIDE_KEY_QUERIES + 1, 128, 2)[:2] == (64, 64)
    assert _launch_config(512, 128, 2)[:2] == (128, 128)
    assert _launch_config(64, 128, 4)[:2] == (64, 64)  # fp32: the shared memory of 64 keys
    assert _launch_config(64, 256, 2)[:2] == (64, 32)


def test_the_switch_restores_the_rule_before(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prefill_attention_module, "SHORT_CHUNK_BLOCKS", False)
    assert [_launch_config(n, 128, 2)[:2] for n in (16, 32, 60, 128, 256)] == [
        (16, 64),
        (32, 64),
        (64, 64),
        (64, 64),
        (64, 64),
    ]


@pytest.mark.parametrize("window", [None, 50, 200])
@pytest.mark.parametrize("seqs", [SHORT, WIDER], ids=["16x128", "64x128"])
def test_short_chunks_over_cached_prefixes(
    device: torch.device, seqs: list[tuple[int, int]], window: int | None
) -> None:
    for dtype in dtypes(device)[1:]:  # the 16-bit ones: fp32 keeps its own blocks
        q, batch = make_batch(seqs, 4, 2, 32, dtype, device, seed=21)
        assert_close(run_prefill(q, batch, window), reference(q, batch, window), q)
        out = run_prefill(q, batch, window, skip_decode_rows=True)
        real = [i for i in range(q.shape[0]) if i != q.shape[0] - 1]  # the decode row is last
        assert_close(out[real], reference(q, batch, window)[real], q[real])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="model-sized shapes on the GPU only")
def test_short_chunks_at_model_size(device: torch.device) -> None:
    # Qwen2.5-7B's heads (28 of 128 over 4): a question after an image, a long chat history;
    # then chunks of 129-256 tokens over long prefixes and none.
    short = [(390, 60), (8000, 60), (2000, 30), (0, 128), (400, 16)]
    wider = [(600, 250), (4000, 200), (0, 160), (390, 60)]
    for seqs, dtype, window in itertools.product(
        (short, wider), (torch.float16, torch.bfloat16), (None, 1024)
    ):
        q, batch = make_batch(seqs, 28, 4, 128, dtype, device, seed=22)
        assert_close(run_prefill(q, batch, window), reference(q, batch, window), q)
