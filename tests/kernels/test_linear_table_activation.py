"""The fused GEMM + table activation (the ViT's fc1 and GELU) against F.linear and the table.

Two oracles. With inputs whose products and sums are exact in float32 and in the output dtype
(multiples of 1/8 scaled by 1/4), the K sum has one value in any order, so the kernel must equal
`table[round(x W^T + b)]` bit for bit: a tile whose deferred activation was skipped, applied
twice or applied to another tile's rows fails it. With random inputs the identity function makes
the output the rounded product itself, held to the float32 summation bound of any order. Small
tiles and few programs give each program many tiles, so the deferral crosses tile, row and
feature edges. On CUDA the MLP of the ViT is also compared with the unfused path it replaces.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ocula.kernels import hopper_or_later
from ocula.kernels.linear_table_activation import fused_applies, linear_table_activation
from ocula.kernels.table_activation import activation_table
from tests.kernels.test_gemv import assert_within_bound, make

ANY_ORDER = 1  # block_k for assert_within_bound: the bound of a sum in any order
SMALL = (32, 32, 32, 2, 4)  # BLOCK_M, BLOCK_N, BLOCK_K, stages, warps: cheap in the interpreter


def needs_tma(device: torch.device) -> None:
    if device.type == "cuda" and not hopper_or_later(device.index):
        pytest.skip("the kernel reads through tensor descriptors (Hopper or later)")


def dtypes16(device: torch.device) -> list[torch.dtype]:
    return [torch.float16] + ([torch.bfloat16] if device.type == "cuda" else [])


def exact_inputs(rows: int, features: int, depth: int, dtype, device, seed: int):
    generator = torch.Generator().manual_seed(seed)

    def eighths(*shape: int) -> torch.Tensor:
        return torch.randint(-8, 9, shape, generator=generator) / 8

    x, weight, bias = eighths(rows, depth), eighths(features, depth) / 4, eighths(features)
    return (t.to(device=device, dtype=dtype) for t in (x, weight, bias))


def tabulated(pre: torch.Tensor, function) -> torch.Tensor:
    table = activation_table(function, pre.dtype, pre.device)
    return table[pre.contiguous().view(torch.int16).long() & 0xFFFF].view(pre.dtype)


@pytest.mark.parametrize(
    "rows,features,depth,config,programs",
    [
        (300, 96, 128, SMALL, 2),  # 30 tiles over 2 programs
        (77, 70, 40, SMALL, 3),  # row, feature and depth tails
        (40, 40, 48, (16, 16, 16, 1, 4), 1),  # one program; CHUNK 8 rows over 3 K steps
        (33, 64, 512, (16, 32, 32, 2, 4), 2),  # more K steps (16) than tile rows: one row a step
        (64, 32, 32, SMALL, 8),  # more programs than tiles
    ],
)
@pytest.mark.parametrize("with_bias", [True, False])
def test_exact_sums_give_the_tabulated_activation_bit_for_bit(
    device: torch.device, rows, features, depth, config, programs, with_bias
) -> None:
    needs_tma(device)
    for dtype in dtypes16(device):
        x, weight, bias = exact_inputs(rows, features, depth, dtype, device, seed=rows)
        bias = bias if with_bias else None
        got = linear_table_activation(x, weight, bias, F.gelu, config, programs)
        pre = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
        expected = tabulated(pre.to(dtype), F.gelu)
        assert got.shape == (rows, features) and got.dtype == dtype
        assert torch.equal(got.view(torch.int16).cpu(), expected.view(torch.int16).cpu())


def identity(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@pytest.mark.parametrize("rows,features,depth", [(150, 96, 256), (45, 70, 296)])
def test_random_products_are_within_the_float32_summation_bound(
    device: torch.device, rows: int, features: int, depth: int
) -> None:
    needs_tma(device)
    for dtype in dtypes16(device):
        x, weight, bias = make(rows, features, depth, dtype, device, seed=depth)
        got = linear_table_activation(x, weight, bias, identity, SMALL, programs=2)
        assert_within_bound(got.cpu(), x.cpu(), weight.cpu(), bias.cpu(), ANY_ORDER)
        plain = linear_table_activation(x, weight, bias, F.gelu, SMALL, 2, activate=False)
        assert torch.equal(plain.view(torch.int16), got.view(torch.int16))


def test_default_config_and_grid(device: torch.device) -> None:
    """The tile the ViT runs (128 x 256 x 64) with the default number of programs."""
    needs_tma(device)
    x, weight, bias = exact_inputs(130, 260, 64, torch.float16, device, seed=5)
    got = linear_table_activation(x, weight, bias, F.gelu)
    pre = F.linear(x.float(), weight.float(), bias.float()).half()
    assert torch.equal(got.view(torch.int16).cpu(), tabulated(pre, F.gelu).view(torch.int16).cpu())


def test_empty_input(device: torch.device) -> None:
    x = torch.empty(0, 64, dtype=torch.float16, device=device)
    weight = torch.zeros(32, 64, dtype=torch.float16, device=device)
    assert linear_table_activation(x, weight, None, F.gelu).shape == (0, 32)


def test_rejects_what_it_cannot_do(device: torch.device) -> None:
    x = torch.zeros(4, 64, dtype=torch.float16, device=device)
    with pytest.raises(ValueError, match="16-bit"):
        linear_table_activation(x.float(), torch.zeros(8, 64, device=device), None, F.gelu)
    with pytest.raises(ValueError, match=r"\[M, K\]"):
        linear_table_activation(x, torch.zeros(8, 32, dtype=x.dtype, device=device), None, F.gelu)
    weight = torch.zeros(8, 64, dtype=x.dtype, device=device)
    with pytest.raises(ValueError, match="bias"):
        linear_table_activation(x, weight, torch.zeros(7, dtype=x.dtype, device=device), F.gelu)
    odd = torch.zeros(4, 60, dtype=x.dtype, device=device)
    with pytest.raises(ValueError, match="16 bytes"):
        linear_table_activation(odd, torch.zeros(8, 60, dtype=x.dtype, device=device), None, F.gelu)


def test_fused_applies_only_to_large_aligned_16_bit_inputs(device: torch.device) -> None:
    weight = torch.zeros(4096, 64, dtype=torch.float16, device=device)
    large = torch.zeros(8192, 64, dtype=torch.float16, device=device)  # 2**25 outputs
    expected = device.type == "cpu" or hopper_or_later(device.index)
    assert fused_applies(large, weight, 4096) == expected
    assert not fused_applies(large[:-1], weight, 4096)  # one row short of the threshold
    assert not fused_applies(large.float(), weight.float(), 4096)
    assert not fused_applies(large[:, :32], weight[:, :32], 4096)  # not contiguous
    odd = torch.zeros(8192, 60, dtype=torch.float16, device=device)  # 120-byte rows
    assert not fused_applies(odd, torch.zeros(4096, 60, dtype=torch.float16, device=device), 4096)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the ViT takes the fused path on CUDA")
@pytest.mark.parametrize("tiles", [8, 32])
def test_vit_mlp_is_bit_identical_to_the_unfused_path(tiles: int) -> None:
    """InternViT-300M's MLP shape on 8 and 32 tiles of 1,025 tokens, random bf16 weights."""
    from ocula.distributed.parallel_group import SINGLE_RANK
    from ocula.models import intern_vit
    from ocula.models.internvl_config import InternViTConfig

    device = torch.device("cuda")
    if not hopper_or_later(device.index):
        pytest.skip("the kernel reads through tensor descriptors (Hopper or later)")
    config = InternViTConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=1,
        num_attention_heads=16,
        image_size=448,
        patch_size=14,
    )
    torch.manual_seed(tiles)
    mlp = intern_vit.InternViTMLP(config, SINGLE_RANK)
    for parameter in mlp.parameters():
        parameter.data.normal_(0, 0.03)
    mlp = mlp.to(device, torch.bfloat16)
    x = torch.randn(tiles, 1025, 1024, device=device, dtype=torch.bfloat16)
    previous = intern_vit.USE_FUSED_FC1
    outputs = {}
    try:
        for fused in (True, False):
            intern_vit.USE_FUSED_FC1 = fused
            with torch.inference_mode():
                outputs[fused] = mlp(x)
    finally:
        intern_vit.USE_FUSED_FC1 = previous
    assert torch.equal(outputs[True].view(torch.int16), outputs[False].view(torch.int16))
