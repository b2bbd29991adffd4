"""The decode attention kernel rotating and storing the new tokens itself (`new_tokens`) against
the two launches it replaces: `rotate_and_store_kv`, then `decode_attention`. Bit for bit: the
output, and every cache slot the step writes."""

from __future__ import annotations

import pytest
import torch

from ocula.engine.forward_batch import ForwardBatch
from ocula.kernels.rotary_store import NewTokens, rotate_and_store_kv
from tests.kernels.test_paged_attention import (  # noqa: F401 (an autouse fixture)
    DECODE,
    dtypes,
    interpreter_runtime_loop_bounds,
    make_batch,
    run_decode,
)


def rope_tables(head_dim: int, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.arange(positions).float()[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def new_kv(
    tokens: int, num_kv_heads: int, head_dim: int, like: torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unrotated k and v of the new tokens: views of one wider projection output, as in a model."""
    generator = torch.Generator().manual_seed(seed)
    width = (2 * num_kv_heads + 3) * head_dim
    fused = torch.randn(tokens, width, generator=generator).to(like.device, like.dtype)
    k = fused[:, : num_kv_heads * head_dim].unflatten(-1, (num_kv_heads, head_dim))
    v = fused[:, num_kv_heads * head_dim : 2 * num_kv_heads * head_dim]
    return k, v.unflatten(-1, (num_kv_heads, head_dim))


def both_ways(
    q: torch.Tensor,
    batch: ForwardBatch,
    window: int | None,
    num_splits: int,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(output, K cache, V cache) unfused and fused, each from the same starting caches."""
    results = []
    for fused in (False, True):
        k_cache, v_cache = batch.kv_pool.layer(0)
        saved = k_cache.clone(), v_cache.clone()
        query = q.clone() if not fused else q
        device = q.device
        positions, slots = batch.positions, batch.out_slots
        cos_table, sin_table = cos.to(device), sin.to(device)
        if fused:
            new = NewTokens(k, v, positions, slots, cos_table, sin_table)
            out = run_decode(query, batch, window, num_splits=num_splits, new_tokens=new)
        else:
            args = (positions, cos_table, sin_table, k_cache, v_cache, slots)
            rotate_and_store_kv(query, k, v, *args)
            out = run_decode(query, batch, window, num_splits=num_splits)
        results.append((out, k_cache.clone(), v_cache.clone()))
        k_cache.copy_(saved[0])
        v_cache.copy_(saved[1])
    return results


@pytest.mark.parametrize("num_splits", [1, 4, 8])
@pytest.mark.parametrize("window", [None, 13])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(8, 2, 16), (7, 1, 24)])
def test_rotating_in_the_kernel_equals_rotating_first_bit_for_bit(
    device: torch.device,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    window: int | None,
    num_splits: int,
) -> None:
    cos, sin = rope_tables(head_dim, 256)
    for dtype in dtypes(device):
        q, batch = make_batch(DECODE, num_heads, num_kv_heads, head_dim, dtype, device, seed=7)
        k, v = new_kv(q.shape[0], num_kv_heads, head_dim, q, seed=8)
        original_q = q.clone()
        unfused, fused = both_ways(q, batch, window, num_splits, k, v, cos, sin)
        for expected, got in zip(unfused, fused, strict=True):
            assert torch.equal(got, expected)
        assert torch.equal(q, original_q)  # the rotation stays in registers


def test_cuda_graph_padding_rows(device: torch.device) -> None:
    """A CUDA-graph batch pads with rows as `ocula.engine.cuda_graphs` builds them: context 1,
    position 0, the all-zero padding row of the slot table and out slot 0 (the scratch slot), and
    identical inputs. Both ways give the same outputs and caches, slot 0 included."""
    cos, sin = rope_tables(16, 64)
    q, batch = make_batch([(20, 1), (5, 1), (0, 1), (0, 1)], 4, 2, 16, torch.float32, device)
    k, v = new_kv(4, 2, 16, q, seed=10)
    padding_row = batch.table_rows[2]
    batch.slot_table[padding_row] = 0
    batch.table_rows[3] = padding_row
    batch.out_slots[2:] = 0
    for tensor in (q, k, v):
        tensor[3] = tensor[2]
    unfused, fused = both_ways(q, batch, None, 4, k, v, cos, sin)
    for expected, got in zip(unfused, fused, strict=True):
        assert torch.equal(got, expected)


def test_new_tokens_are_checked(device: torch.device) -> None:
    cos, sin = rope_tables(16, 64)
    q, batch = make_batch([(20, 1), (3, 1)], 4, 2, 16, torch.float32, device)
    k, v = new_kv(2, 2, 16, q, seed=11)
    cos, sin = cos.to(device), sin.to(device)
    with pytest.raises(ValueError, match="share one layout"):
        new = NewTokens(k, v.contiguous(), batch.positions, batch.out_slots, cos, sin)
        run_decode(q, batch, None, new_tokens=new)
    with pytest.raises(ValueError, match="float32"):
        new = NewTokens(k, v, batch.positions, batch.out_slots, cos.half(), sin.half())
        run_decode(q, batch, None, new_tokens=new)


@pytest.mark.parametrize("steps", ["decodes", "mixed"])
def test_the_attention_layer_hands_decode_steps_to_the_rotating_kernel(
    device: torch.device, monkeypatch: pytest.MonkeyPatch, steps: str
) -> None:
    """Through `Attention.forward` with the Triton backend and a kernel-path Rope (on CPU the
    interpreter runs the kernels): the same output and caches with the fused path on and off;
    a step that is not decodes only is never handed to it."""
    from types import SimpleNamespace

    import ocula.attention.triton_backend as backend_module
    from ocula.layers import rotary
    from ocula.layers.attention import Attention

    monkeypatch.setattr(rotary, "use_triton", lambda tensor: True)
    seqs = DECODE if steps == "decodes" else [(37, 5), (50, 1)]
    q, batch = make_batch(seqs, 8, 2, 16, torch.float32, device, seed=12)
    k, v = new_kv(q.shape[0], 2, 16, q, seed=13)
    cos, sin = rope_tables(16, 256)
    tables = SimpleNamespace(cos_cache=cos.to(device), sin_cache=sin.to(device))
    layer = Attention(8, 2, 16, 16**-0.5, 0, backend=backend_module.TritonBackend())
    calls: list[int] = []
    real = backend_module.decode_attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("new_tokens") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(backend_module, "decode_attention", counting)
    results = []
    for rotate_in_decode in (False, True):
        monkeypatch.setattr(backend_module, "ROTATE_IN_DECODE", rotate_in_decode)
        caches = [cache.clone() for cache in batch.kv_pool.layer(0)]
        rope = rotary.Rope(tables, batch.positions, torch.float32)
        out = layer(q.clone(), k.clone(), v.clone(), batch, rope)
        results.append((out, *(cache.clone() for cache in batch.kv_pool.layer(0))))
        for cache, saved in zip(batch.kv_pool.layer(0), caches, strict=True):
            cache.copy_(saved)
    for expected, got in zip(*results, strict=True):
        assert torch.equal(got, expected)
    assert calls == ([False, True] if steps == "decodes" else [False, False])


def test_a_single_decode_keeps_the_separate_rotation(device: torch.device) -> None:
    import ocula.attention.triton_backend as backend_module

    q, batch = make_batch([(20, 1)], 4, 2, 16, torch.float32, device)
    k, v = new_kv(1, 2, 16, q, seed=14)
    cos, sin = (t.to(device) for t in rope_tables(16, 64))
    caches = batch.kv_pool.layer(0)
    backend = backend_module.TritonBackend()
    args = (q, k, v, *caches, batch, 0.25, None, batch.positions, cos, sin)
    assert backend.attend_rotating(*args) is None
