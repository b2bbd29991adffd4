"""Which batch sizes and token counts the CUDA graphs capture (host arithmetic, no GPU needed):
every batch the runner may send them falls in a bucket, and no bucket is larger than what the
engine can run (the slot table's width, --batch_max_tokens)."""

from __future__ import annotations

import pytest

from ocula.config import EngineArgs
from ocula.engine.cuda_graphs import batch_size_buckets, graph_buckets
from ocula.engine.piecewise_graphs import token_count_buckets


@pytest.mark.parametrize("largest", [1, 3, 16, 40, 64, 100, 256, 512, 1000])
def test_buckets_cover_every_size_up_to_the_largest(largest: int) -> None:
    for buckets in (batch_size_buckets(largest), token_count_buckets(largest)):
        assert buckets == sorted(set(buckets)) and buckets[-1] == largest
        assert all(any(b >= n for b in buckets) for n in range(1, largest + 1))


def test_piecewise_sizes_stay_within_the_engines_limits() -> None:
    args = EngineArgs(model_dir="unused", chunked_prefill_size=100, graph_max_batch_size=8)
    decode, piecewise = graph_buckets(args, table_width=4096)
    assert decode == [1, 2, 4, 8] and piecewise[-1] == 100  # --batch_max_tokens (chunk size)
    assert graph_buckets(args, table_width=60)[1][-1] == 60  # no row holds more tokens
    args = EngineArgs(model_dir="unused", piecewise_graph_max_tokens=0)
    assert graph_buckets(args, table_width=4096)[1] == []
    args = EngineArgs(model_dir="unused", running_max_req_size=5)
    assert graph_buckets(args, table_width=4096) == ([1, 2, 4, 5], token_count_buckets(512))


def test_negative_piecewise_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="piecewise_graph_max_tokens"):
        EngineArgs(model_dir="unused", piecewise_graph_max_tokens=-1).validate()


def test_graph_pool_estimate_counts_what_the_graphs_keep() -> None:
    from ocula.engine.memory_budget import ForwardMemory, estimate_graph_pool

    largest = ForwardMemory(peak=1000, hidden_row=10, logits_row=100)
    # Decode logits of every bucket (1 + 2 + 4 rows), no piecewise graphs.
    assert estimate_graph_pool([1, 2, 4], [], largest, attention_row=8) == 1000 + 7 * 100
    # Plus each piecewise bucket's hidden states (its pieces' and its whole-step graph's) and
    # the q and output buffers of the largest.
    expected = 1000 + 7 * 100 + 2 * (16 + 32) * 10 + 2 * 32 * 8
    assert estimate_graph_pool([1, 2, 4], [16, 32], largest, attention_row=8) == expected


def test_static_inputs_take_a_smaller_batch_and_pad_the_rest() -> None:
    import torch

    from ocula.utils.device import copy_padded_

    static = torch.full((6,), 9)
    copy_padded_(static, torch.tensor([4, 5]), size=4, pad=-1)
    assert static.tolist() == [4, 5, -1, -1, 9, 9]  # rows past the bucket are left alone
    copy_padded_(static, None, size=3, pad=0)
    assert static.tolist() == [0, 0, 0, -1, 9, 9]


def test_graph_captures_keep_the_garbage_collector_off_and_restore_it() -> None:
    import gc

    from ocula.utils.device import no_garbage_collection

    assert gc.isenabled()
    with pytest.raises(RuntimeError), no_garbage_collection():
        assert not gc.isenabled()
        raise RuntimeError("a failed capture")
    assert gc.isenabled()
    gc.disable()
    try:
        with no_garbage_collection():
            pass
        assert not gc.isenabled()  # left as the caller had it
    finally:
        gc.enable()
