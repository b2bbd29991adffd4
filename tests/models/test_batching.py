"""A varlen batch (prefill, prefill after a cached prefix, decodes) equals one sequence at a time."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.helpers.forward import PagedRunner
from tests.models.conftest import PROMPTS, encode, load_ocula

# Same kernels on the same rows: batching changes only which rows share a matmul.
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


@pytest.mark.parametrize("arch", ["llama", "internlm2"])
def test_mixed_batch_equals_sequential(tiny_checkpoint: Any, arch: str) -> None:
    checkpoint = tiny_checkpoint(arch)
    model = load_ocula(checkpoint)
    long_ids = encode(checkpoint, PROMPTS[2])
    mid_ids = encode(checkpoint, PROMPTS[1])
    short_ids = encode(checkpoint, "caches remember")
    decode_a, decode_b = 17, 42

    # Sequential: every sequence alone.
    alone = PagedRunner(model)
    expected_prefill = alone.step([(0, long_ids)], all_logits=True)
    alone.step([(1, mid_ids[:3])])
    expected_after_prefix = alone.step([(1, mid_ids[3:])], all_logits=True)
    alone.step([(2, short_ids)])
    expected_decode_a = alone.step([(2, [decode_a])])
    alone.step([(3, mid_ids)])
    expected_decode_b = alone.step([(3, [decode_b])])

    # Batched: the same work, the cached parts prefilled first, then one mixed step.
    batched = PagedRunner(model)
    batched.step([(1, mid_ids[:3]), (2, short_ids), (3, mid_ids)])
    chunks = [(2, [decode_a]), (1, mid_ids[3:]), (0, long_ids), (3, [decode_b])]
    logits = batched.step(chunks, all_logits=True)
    sizes = [len(ids) for _, ids in chunks]
    got_decode_a, got_after_prefix, got_prefill, got_decode_b = logits.split(sizes)

    torch.testing.assert_close(got_prefill, expected_prefill, **TOLERANCE)
    torch.testing.assert_close(got_after_prefix, expected_after_prefix, **TOLERANCE)
    torch.testing.assert_close(got_decode_a, expected_decode_a, **TOLERANCE)
    torch.testing.assert_close(got_decode_b, expected_decode_b, **TOLERANCE)


def test_cached_prefix_generation_equals_full_prefill(tiny_checkpoint: Any) -> None:
    checkpoint = tiny_checkpoint("qwen2")
    model = load_ocula(checkpoint)
    prompt_ids = encode(checkpoint, PROMPTS[2])
    runner = PagedRunner(model)
    full_tokens, full_logits = runner.generate_greedy(0, prompt_ids, 6)
    tokens, logits = runner.generate_greedy(1, prompt_ids, 6, cached_prefix=11)
    assert tokens == full_tokens
    torch.testing.assert_close(logits, full_logits, **TOLERANCE)


def test_spliced_embeddings_replace_token_embeddings(tiny_checkpoint: Any) -> None:
    """Splicing token X's embedding at a row of token Y computes what token X would."""
    checkpoint = tiny_checkpoint("llama")
    model = load_ocula(checkpoint)
    prompt_ids = encode(checkpoint, PROMPTS[1])
    substituted = list(prompt_ids)
    rows = [1, 3]
    for row in rows:
        substituted[row] = 99

    expected = PagedRunner(model).step([(0, substituted)], all_logits=True)
    runner = PagedRunner(model)
    batch = runner.build_batch([(0, prompt_ids)], all_logits=True)
    batch.spliced_rows = torch.tensor(rows)
    batch.spliced_embeds = model.model.embed_tokens.weight[[99, 99]].clone()
    with torch.no_grad():
        got = model.compute_logits(model(batch)[batch.logits_indices])
    torch.testing.assert_close(got, expected, atol=0.0, rtol=0.0)
