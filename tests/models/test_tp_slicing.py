"""Loading with ParallelGroup(rank, size) gives each rank exactly its slice of every weight.

Expectations are computed independently of the loaders: from the transformers reference model's
full tensors (for InternLM2, the mapped Llama, so the packed wqkv is unpacked by the helper).
No process group is created; only loading runs, which needs no collectives.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from ocula.distributed.parallel_group import ParallelGroup
from ocula.layers.embedding import VocabParallelEmbedding
from tests.models.conftest import load_ocula, load_reference

INTERNLM2_TO_LLAMA = (
    ("model.tok_embeddings.", "model.embed_tokens."),
    (".attention.", ".self_attn."),
    (".feed_forward.", ".mlp."),
    (".attention_norm.", ".input_layernorm."),
    (".ffn_norm.", ".post_attention_layernorm."),
)


def rows(tensor: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    return tensor.chunk(size, dim=0)[rank]


def vocab_rows(tensor: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Rank `rank`'s rows [rank * n, (rank + 1) * n) of the table zero-padded to size * n rows,
    n = ceil(vocab / size) rounded up to a multiple of 64."""
    share = math.ceil(tensor.shape[0] / size)
    per_rank = math.ceil(share / 64) * 64
    padded = torch.zeros(per_rank * size, *tensor.shape[1:])
    padded[: tensor.shape[0]] = tensor
    return rows(padded, rank, size)


def expected_rank_weights(full: dict[str, torch.Tensor], config: Any, rank: int, size: int) -> dict:
    """Llama-named full tensors -> the tensors one rank must hold, under Ocula's names."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = config.num_key_value_heads
    if kv_heads >= size:
        kv_range = (rank * kv_heads // size, (rank + 1) * kv_heads // size)
    else:
        kv_range = (rank * kv_heads // size, rank * kv_heads // size + 1)

    def kv(tensor: torch.Tensor) -> torch.Tensor:
        return tensor[kv_range[0] * head_dim : kv_range[1] * head_dim]

    expected = {}
    for name, tensor in full.items():
        if ".q_proj." in name:
            fused = name.replace("q_proj", "qkv_proj")
            k, v = full[name.replace("q_proj", "k_proj")], full[name.replace("q_proj", "v_proj")]
            expected[fused] = torch.cat([rows(tensor, rank, size), kv(k), kv(v)])
        elif ".gate_proj." in name:
            up = full[name.replace("gate_proj", "up_proj")]
            fused = name.replace("gate_proj", "gate_up_proj")
            expected[fused] = torch.cat([rows(tensor, rank, size), rows(up, rank, size)])
        elif (".o_proj." in name or ".down_proj." in name) and name.endswith("weight"):
            expected[name] = tensor.chunk(size, dim=1)[rank]
        elif "embed_tokens" in name or "lm_head" in name:
            expected[name] = vocab_rows(tensor, rank, size)
        elif any(f".{p}_proj." in name for p in ("k", "v", "up")):
            continue  # folded into the fused parameters above
        else:  # norms and row-parallel biases are replicated
            expected[name] = tensor
    return expected


def llama_name(name: str, arch: str) -> str:
    """Ocula's parameter name -> the Llama-style name `expected_rank_weights` uses."""
    if arch != "internlm2":
        return name
    if name.startswith("output."):
        return "lm_head." + name.removeprefix("output.")
    for old, new in INTERNLM2_TO_LLAMA:
        name = name.replace(old, new)
    return name


CASES = [
    ("llama", 2, {}),
    ("qwen2", 2, {}),
    ("internlm2", 2, {"bias": True}),
    ("llama", 4, {"attention_bias": True}),  # 2 KV heads over 4 ranks: each replicated twice
    ("internlm2", 4, {}),
    ("mistral", 2, {"num_key_value_heads": 4}),  # 2 KV heads per rank
]


@pytest.mark.parametrize(("arch", "size", "overrides"), CASES)
def test_each_rank_holds_its_slices(
    tiny_checkpoint: Any, arch: str, size: int, overrides: dict
) -> None:
    checkpoint = tiny_checkpoint(arch, **overrides)
    reference = load_reference(checkpoint)
    full = {name: tensor.detach() for name, tensor in reference.state_dict().items()}
    for rank in range(size):
        model = load_ocula(checkpoint, tp=ParallelGroup(rank=rank, size=size))
        expected = expected_rank_weights(full, reference.config, rank, size)
        got = {llama_name(name, arch): p for name, p in model.named_parameters()}
        assert got.keys() == expected.keys()
        for name, param in got.items():
            assert torch.equal(param, expected[name]), f"rank {rank}/{size}: {name}"
        _, num_kv_heads, _ = model.kv_cache_shape()
        assert num_kv_heads == max(1, reference.config.num_key_value_heads // size)


def test_vocab_rows_fill_the_padded_table_from_the_first_rank() -> None:
    full = torch.arange(150 * 3, dtype=torch.float32).reshape(150, 3)
    ranks = [VocabParallelEmbedding(150, 3, ParallelGroup(rank=r, size=2)) for r in range(2)]
    for embedding in ranks:
        embedding.weight.weight_loader(embedding.weight, full)
    first, second = (embedding.weight.data for embedding in ranks)
    assert first.shape == second.shape == (128, 3)  # ceil(150 / 2) = 75, padded to 128
    assert torch.equal(first, full[:128])
    assert torch.equal(second[:22], full[128:]) and not second[22:].any()


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_vocab_is_padded_and_split_in_equal_shards(size: int) -> None:
    full = torch.arange(10 * 3, dtype=torch.float32).reshape(10, 3)
    for rank in range(size):
        embedding = VocabParallelEmbedding(10, 3, ParallelGroup(rank=rank, size=size))
        embedding.weight.weight_loader(embedding.weight, full)
        assert torch.equal(embedding.weight.data, vocab_rows(full, rank, size))
        assert embedding.weight.shape[0] % 64 == 0  # whole 16-byte rows of logits for cuBLAS
