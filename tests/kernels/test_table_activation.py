"""The lookup-table activation against the function it tabulates, bit for bit.

The kernel moves 16-bit patterns only (no float arithmetic), so bf16 runs in Triton's interpreter
too. On CUDA the oracle is the function applied to the same tensor: torch's CUDA GELU computes
each element alone, which is the contract the ViT relies on. torch's CPU GELU does not (its
vectorized erf and its scalar tail round differently, so an element's result depends on where it
sits; ~3% of random bf16 inputs), and the table path never runs on CPU in the engine: there the
oracle is the function's value on the every-pattern tensor the table is built from.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from ocula.kernels.table_activation import BLOCK, activation_table, table_activation_, warm_up

DTYPES = (torch.float16, torch.bfloat16)


def every_pattern(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    patterns = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    return patterns.view(dtype).to(device)


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int16).cpu()


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_bit_pattern_matches_the_function(dtype: torch.dtype, device: torch.device) -> None:
    x = every_pattern(dtype, device)
    expected = F.gelu(x)
    got = table_activation_(x.clone(), F.gelu)
    assert torch.equal(bits(got), bits(expected))  # NaN patterns included


def oracle(x: torch.Tensor) -> torch.Tensor:
    """F.gelu(x) on CUDA; on CPU, F.gelu's value for each pattern on the every-pattern tensor."""
    if x.is_cuda:
        return F.gelu(x)
    table = F.gelu(every_pattern(x.dtype, x.device)).view(torch.int16)
    return table[x.view(torch.int16).long() + (1 << 15)].view(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("numel", [1, BLOCK - 1, BLOCK, 3 * BLOCK + 17, 1 << 22])
def test_random_tensors_and_block_tails(
    dtype: torch.dtype, numel: int, device: torch.device
) -> None:
    if numel > 1 << 16 and device.type != "cuda":
        pytest.skip("the large tensor checks CUDA's GELU (elementwise) at the ViT's scale")
    generator = torch.Generator().manual_seed(numel)
    x = (torch.randn(numel, generator=generator) * 4).to(device=device, dtype=dtype)
    got = table_activation_(x.clone(), F.gelu)
    assert torch.equal(bits(got), bits(oracle(x)))


def test_works_in_place_on_a_matrix(device: torch.device) -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(37, 129, generator=generator).to(device=device, dtype=torch.float16)
    expected = oracle(x)
    out = table_activation_(x, F.gelu)
    assert out is x
    assert out.shape == (37, 129)
    assert torch.equal(bits(out), bits(expected))


def test_transformers_gelu_is_the_tabulated_function(device: torch.device) -> None:
    """InternViT's `hidden_act` "gelu" resolves to transformers' GELUActivation: the table of
    F.gelu must be its map too."""
    x = every_pattern(torch.bfloat16, device)
    assert torch.equal(bits(ACT2FN["gelu"](x)), bits(F.gelu(x)))


def test_empty_tensor_and_the_table_is_cached(device: torch.device) -> None:
    empty = torch.empty(0, 8, dtype=torch.bfloat16, device=device)
    assert table_activation_(empty, F.gelu) is empty
    first = activation_table(F.gelu, torch.bfloat16, device)
    assert first.dtype == torch.int16 and first.shape == (1 << 16,)
    assert activation_table(F.gelu, torch.bfloat16, device) is first


def test_rejects_what_it_cannot_do(device: torch.device) -> None:
    with pytest.raises(ValueError, match="16-bit"):
        table_activation_(torch.zeros(4, device=device), F.gelu)
    strided = torch.zeros(4, 6, dtype=torch.float16, device=device)[:, ::2]
    with pytest.raises(ValueError, match="contiguous"):
        table_activation_(strided, F.gelu)
    with pytest.raises(ValueError, match="elementwise"):
        activation_table(lambda x: x.float(), torch.float16, device)


def test_warm_up_builds_the_table_and_runs_the_kernel(device: torch.device) -> None:
    """The eager engine calls it at start-up, so the first large batch compiles nothing."""

    def half_gelu(x: torch.Tensor) -> torch.Tensor:  # a function no other test tabulated
        return F.gelu(x) / 2

    warm_up(half_gelu, torch.float16, device)
    table = activation_table(half_gelu, torch.float16, device)
    assert torch.equal(
        bits(table.view(torch.float16)), bits(half_gelu(every_pattern_unsigned(device)))
    )


def every_pattern_unsigned(device: torch.device) -> torch.Tensor:
    """Pattern i at index i (the table's order)."""
    return every_pattern(torch.float16, device).roll(-(1 << 15))
