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
