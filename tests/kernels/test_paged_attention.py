"""The paged attention kernels and the Triton backend against `paged_attention_reference`.

Batches are real `ForwardBatch` objects over a `KVCachePool`, with shuffled slots (no sequence's
slots are contiguous), shuffled slot-table rows, garbage in the unused table entries and a q that
is a strided view of a fused projection. On CPU the kernels run in Triton's interpreter, so the
shapes stay small and the blocks are 16 wide to make the online softmax cross many blocks.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import pytest
import torch

from ocula.attention.reference import paged_attention_reference
from ocula.attention.triton_backend import TritonBackend
from ocula.engine.forward_batch import ForwardBatch
from ocula.engine.kv_pool import KVCachePool
from ocula.kernels.decode_attention import decode_attention, decode_num_splits
from ocula.kernels.prefill_attention import prefill_attention
from ocula.layers.attention import get_attention_backend
from ocula.utils.triton_interpreter import runtime_loop_bounds
from tests.helpers.compiles import recorded_compiles

# The reference runs in float32 on the same (rounded) inputs. fp32: summation order only.
# fp16/bf16: the kernels round the probabilities to the input dtype before P @ V and round the
# output; two units in the last place of the dtype at 1.0 covers both.
TOLERANCE = {
    torch.float32: {"atol": 2e-5, "rtol": 1e-5},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 1.6e-2, "rtol": 1.6e-2},
}


def dtypes(device: torch.device) -> list[torch.dtype]:
    # Triton's interpreter computes bf16 wrongly: bf16 only on the GPU.
    extra = [torch.bfloat16] if device.type == "cuda" else []
    return [torch.float32, torch.float16, *extra]


@pytest.fixture(autouse=True)
def interpreter_runtime_loop_bounds() -> Iterator[None]:
    """On CPU, lets Triton's interpreter run loops to bounds read from device memory
    (`ocula.utils.triton_interpreter`), for the duration of each test."""
    with runtime_loop_bounds():
        yield


def make_batch(
    seqs: list[tuple[int, int]],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
) -> tuple[torch.Tensor, ForwardBatch]:
    """(q, batch) for sequences given as (cached tokens, new tokens), with random K/V in the pool.

    q is a [T, num_heads, head_dim] view of a wider fused qkv projection (token stride is not
    num_heads * head_dim)."""
    generator = torch.Generator().manual_seed(seed)
    ctx_lens = [cached + new for cached, new in seqs]
    query_lens = [new for _, new in seqs]
    num_slots = sum(ctx_lens) + 9
    pool = KVCachePool(1, num_slots, num_kv_heads, head_dim, dtype, device)
    for cache in (*pool.k_caches, *pool.v_caches):
        cache.copy_(torch.randn(cache.shape, generator=generator))
    # Unused table entries point at arbitrary slots: reading past a context would show.
    width = max(ctx_lens) + 5
    num_rows = len(seqs) + 2
    slot_table = torch.randint(0, num_slots + 1, (num_rows, width), generator=generator)
    table_rows = torch.randperm(num_rows, generator=generator)[: len(seqs)]
    slots = torch.randperm(num_slots, generator=generator) + 1  # never the scratch slot 0
    used = 0
    for row, ctx in zip(table_rows.tolist(), ctx_lens, strict=True):
        slot_table[row, :ctx] = slots[used : used + ctx]
        used += ctx
    starts = torch.tensor([0, *query_lens]).cumsum(0)
    lens = list(zip(table_rows.tolist(), ctx_lens, query_lens, strict=True))
    num_tokens = sum(query_lens)
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=generator)
    q = qkv.to(device=device, dtype=dtype)[:, : num_heads * head_dim]
    batch = ForwardBatch(
        input_ids=torch.zeros(num_tokens, dtype=torch.int64, device=device),
        positions=torch.cat([torch.arange(c - n, c) for _, c, n in lens]).to(device),
        query_start_loc=starts.to(device=device, dtype=torch.int32),
        seq_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=device),
        slot_table=slot_table.to(device=device, dtype=torch.int32),
        table_rows=table_rows.to(device),
        out_slots=torch.cat([slot_table[r, c - n : c] for r, c, n in lens]).to(device),
        logits_indices=(starts[1:] - 1).to(device),
        kv_pool=pool,
        query_lens_cpu=query_lens,
        seq_lens_cpu=ctx_lens,
    )
    return q.unflatten(-1, (num_heads, head_dim)), batch


def reference(q: torch.Tensor, batch: ForwardBatch, window: int | None) -> torch.Tensor:
    k_cache, v_cache = (cache.float() for cache in batch.kv_pool.layer(0))
    scale = q.shape[-1] ** -0.5
    return paged_attention_reference(q.float(), k_cache, v_cache, batch, scale, window)


def paged_args(q: torch.Tensor, batch: ForwardBatch) -> tuple[torch.Tensor | float, ...]:
    """The positional arguments both kernels share, scale 1/sqrt(head_dim)."""
    k_cache, v_cache = batch.kv_pool.layer(0)
    tables = (batch.slot_table, batch.table_rows, batch.query_start_loc, batch.seq_lens)
    return (q, k_cache, v_cache, *tables, q.shape[-1] ** -0.5)


def run_prefill(
    q: torch.Tensor, batch: ForwardBatch, window: int | None, **kw: object
) -> torch.Tensor:
    return prefill_attention(
        *paged_args(q, batch), max(batch.query_lens_cpu), sliding_window=window, **kw
    )


def run_decode(
    q: torch.Tensor, batch: ForwardBatch, window: int | None, **kw: object
) -> torch.Tensor:
    bound = max(batch.seq_lens_cpu)
    return decode_attention(*paged_args(q, batch), bound, sliding_window=window, block_n=16, **kw)


def assert_close(out: torch.Tensor, expected: torch.Tensor, q: torch.Tensor) -> None:
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.float(), expected, **TOLERANCE[q.dtype])


# A prefill chunk after a cached prefix, a decode row, a fresh prompt and a short decode.
MIXED = [(37, 21), (50, 1), (0, 19), (4, 1)]


@pytest.mark.parametrize("window", [None, 24])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(4, 2, 16), (4, 1, 24)])
def test_prefill_mixed_batch(
    device: torch.device, num_heads: int, num_kv_heads: int, head_dim: int, window: int | None
) -> None:
    for dtype in dtypes(device):
        q, batch = make_batch(MIXED, num_heads, num_kv_heads, head_dim, dtype, device, seed=1)
        out = run_prefill(q, batch, window, block_m=16, block_n=16)
        assert_close(out, reference(q, batch, window), q)


def test_prefill_without_gqa_and_default_blocks(device: torch.device) -> None:
    # Group 1, head_dim 8 (padded to 16), the launch's own block sizes.
    q, batch = make_batch([(9, 30), (0, 5), (70, 1)], 2, 2, 8, torch.float32, device, seed=2)
    for window in (None, 7):
        assert_close(run_prefill(q, batch, window), reference(q, batch, window), q)


@pytest.mark.parametrize("window", [None, 5, 21])
def test_prefill_block_boundaries(device: torch.device, window: int | None) -> None:
    # Cached prefixes of 16..31 put the first query of every block at each residue mod the
    # 16-key block, so each edge of the window, unmasked and diagonal key ranges gets hit.
    seqs = [(cached, 20) for cached in range(16, 32)]
    q, batch = make_batch(seqs, 1, 1, 16, torch.float32, device, seed=12)
    out = run_prefill(q, batch, window, block_m=16, block_n=16)
    assert_close(out, reference(q, batch, window), q)


@pytest.mark.parametrize("window", [None, 13])
def test_decode_split_boundaries(device: torch.device, window: int | None) -> None:
    # Contexts 1..69 against 16-key blocks and 4 splits: every tail length and empty splits.
    q, batch = make_batch(
        [(ctx - 1, 1) for ctx in range(1, 70, 3)], 2, 1, 16, torch.float32, device
    )
    assert_close(run_decode(q, batch, window, num_splits=4), reference(q, batch, window), q)


# Contexts of 1 and 3 leave most of the 8 splits empty; 70 and 200 cross several 16-key blocks.
DECODE = [(0, 1), (2, 1), (69, 1), (199, 1)]


@pytest.mark.parametrize("window", [None, 50])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(8, 2, 16), (7, 1, 24)])
def test_decode_over_splits(
    device: torch.device, num_heads: int, num_kv_heads: int, head_dim: int, window: int | None
) -> None:
    # Groups of 4 and 7 (Qwen2-0.5B's 14 heads over 2 KV heads), head_dim a power of two or not.
    for dtype in dtypes(device):
        q, batch = make_batch(DECODE, num_heads, num_kv_heads, head_dim, dtype, device, seed=3)
        out = run_decode(q, batch, window, num_splits=8)
        assert_close(out, reference(q, batch, window), q)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_decode_with_few_splits_and_no_gqa(device: torch.device, num_splits: int) -> None:
    q, batch = make_batch([(40, 1), (0, 1), (17, 1)], 2, 2, 16, torch.float32, device, seed=4)
    for window in (None, 5):
        out = run_decode(q, batch, window, num_splits=num_splits)
        assert_close(out, reference(q, batch, window), q)


def test_decode_padded_row_gets_zeros(device: torch.device) -> None:
    # A CUDA-graph batch pads with sequences of no context: they must not produce NaNs.
    q, batch = make_batch([(20, 1), (0, 1)], 4, 2, 16, torch.float32, device, seed=5)
    expected = reference(q, batch, None)
    batch.seq_lens[1] = 0
    out = run_decode(q, batch, None, num_splits=4)
    torch.testing.assert_close(out[0], expected[0], **TOLERANCE[torch.float32])
    assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_mixed_batch_split_between_the_kernels(device: torch.device) -> None:
    # The prefill kernel skips the decode rows, the decode kernel fills exactly those.
    for dtype in dtypes(device):
        q, batch = make_batch(MIXED, 4, 2, 16, dtype, device, seed=13)
        out = torch.full(q.shape, float("nan"), dtype=dtype, device=device)
        run_prefill(q, batch, None, skip_decode_rows=True, out=out, block_m=16, block_n=16)
        decode_rows = [21, 21 + 1 + 19]  # the rows of the two sequences with one new token
        assert out[decode_rows].isnan().all() and out.isnan().sum() == 2 * out[0].numel()
        run_decode(q, batch, None, num_splits=2, out=out)
        assert_close(out, reference(q, batch, None), q)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts compiles on the GPU")
def test_a_mixed_batch_runs_the_kernel_compiled_for_prefills(device: torch.device) -> None:
    q, batch = make_batch(MIXED, 4, 2, 24, torch.float16, device, seed=14)
    run_prefill(q, batch, None, block_m=16, block_n=16)  # prefills only: may compile
    with recorded_compiles() as compiled:
        out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=device)
        run_prefill(q, batch, None, skip_decode_rows=True, out=out, block_m=16, block_n=16)
    assert not [name for name in compiled if "prefill" in name]
    assert out.isnan().sum() == 2 * out[0].numel()  # the decode rows were still skipped


def test_num_splits_is_a_power_of_two_from_host_values() -> None:
    assert decode_num_splits(1, 1, 8) == 1
    assert decode_num_splits(300, 1, 8) == 2
    assert decode_num_splits(1 << 20, 1, 8) == 32
    assert decode_num_splits(1 << 20, 256, 8) == 1
    for bound, seqs in itertools.product((1, 100, 5000, 70000), (1, 3, 64)):
        splits = decode_num_splits(bound, seqs, 4)
        assert splits >= 1 and splits & (splits - 1) == 0


def test_backend_is_registered_and_picks_the_kernel(
    device: torch.device, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = get_attention_backend("triton")
    assert isinstance(backend, TritonBackend)
    calls: list[str] = []

    def counting(name: str, kernel: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def run(*args: object, **kwargs: object) -> torch.Tensor:
            calls.append(name)
            return kernel(*args, **kwargs)

        return run

    module = "ocula.attention.triton_backend"
    monkeypatch.setattr(f"{module}.prefill_attention", counting("prefill", prefill_attention))
    monkeypatch.setattr(f"{module}.decode_attention", counting("decode", decode_attention))
    steps = [([(3, 1), (30, 1)], ["decode"]), ([(3, 1), (0, 6)], ["prefill", "decode"])]
    for seqs, kernels in [*steps, ([(9, 4), (0, 6)], ["prefill"])]:
        calls.clear()
        q, batch = make_batch(seqs, 4, 2, 16, torch.float32, device, seed=6)
        k_cache, v_cache = batch.kv_pool.layer(0)
        out = backend.attend(q, k_cache, v_cache, batch, 16**-0.5, None)
        assert calls == kernels
        assert_close(out, reference(q, batch, None), q)
    assert backend.decode_bound([3, 30]) == 32
    backend.decode_context_bound = 4096
    assert backend.decode_bound([3, 30]) == 4096


@pytest.mark.parametrize("name", ["triton", "reference"])
def test_backends_write_into_a_longer_output_buffer(device: torch.device, name: str) -> None:
    # The piecewise graphs' contract: `out` has padding rows past the batch's tokens, which stay.
    q, batch = make_batch(MIXED, 4, 2, 16, torch.float32, device, seed=14)
    k_cache, v_cache = batch.kv_pool.layer(0)
    tokens = q.shape[0]
    padded_q = torch.cat([q, torch.randn(3, *q.shape[1:], device=device)])
    buffer = torch.full(padded_q.shape, 7.0, device=device)
    out = get_attention_backend(name).attend(
        padded_q, k_cache, v_cache, batch, 16**-0.5, None, out=buffer
    )
    assert out is buffer
    assert torch.equal(buffer[tokens:], torch.full_like(buffer[tokens:], 7.0))
    assert_close(buffer[:tokens], reference(q, batch, None), q)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="model-sized shapes on the GPU only")
@pytest.mark.parametrize("head_dim", [80, 128])
def test_model_sized_shapes_with_default_blocks(device: torch.device, head_dim: int) -> None:
    # Long prompts over a cached prefix, decodes of a few thousand keys (several splits), 7:1 GQA.
    mixed = [(700, 300), (0, 1200), (2500, 1), (31, 1)]
    decode = [(3000, 1), (1, 1), (517, 1), (4095, 1)]
    for dtype, window in itertools.product(dtypes(device), (None, 256)):
        q, batch = make_batch(mixed, 14, 2, head_dim, dtype, device, seed=8)
        expected = reference(q, batch, window)
        assert_close(run_prefill(q, batch, window), expected, q)  # decode rows in 128-row blocks
        for seqs in (mixed, decode):  # the backend: prefill + decode kernels, then decode alone
            q, batch = make_batch(seqs, 14, 2, head_dim, dtype, device, seed=9)
            k_cache, v_cache = batch.kv_pool.layer(0)
            out = TritonBackend().attend(q, k_cache, v_cache, batch, head_dim**-0.5, window)
            assert_close(out, reference(q, batch, window), q)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_decode_replays_in_a_cuda_graph(device: torch.device) -> None:
    # Captured once at a fixed bound, replayed after the contexts and the queries changed in place.
    q, batch = make_batch([(30, 1), (100, 1), (0, 1)], 8, 2, 64, torch.float16, device, seed=10)
    k_cache, v_cache = batch.kv_pool.layer(0)
    backend = TritonBackend(decode_context_bound=batch.slot_table.shape[1])
    static_q = q.clone()
    backend.attend(static_q, k_cache, v_cache, batch, 0.125, None)  # compiles outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = backend.attend(static_q, k_cache, v_cache, batch, 0.125, None)
    batch.seq_lens_cpu = [34, 101, 5]
    batch.seq_lens.copy_(torch.tensor(batch.seq_lens_cpu, dtype=torch.int32))
    static_q.copy_(torch.randn(q.shape, generator=torch.Generator().manual_seed(11)).to(q))
    graph.replay()
    assert_close(static_out, reference(static_q, batch, None), static_q)  # scale 64**-0.5
