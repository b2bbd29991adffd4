"""The skinny kernel (2-32 rows: small decode batches, short prefill chunks) against a float64
reference, through tensor descriptors and through pointer loads, its row independence, its
configs and the dispatch in `ocula.layers.linear`.

The kernel's K sum runs inside tensor-core dots in an order the hardware picks, so the bound used
is the one for any order: K products summed, the bias added, then one rounding to the output
dtype (`assert_within_bound` with one-wide steps: n = K + 2 float32 roundings). A kernel that
multiplied float32 rows in TF32 (2^-11 per product), accumulated in 16 bits or dropped a term
would not meet it.
"""

from __future__ import annotations

import itertools
import types

import pytest
import torch
import torch.nn.functional as F
import triton

from ocula.kernels import hopper_or_later
from ocula.kernels import skinny_linear as skinny_module
from ocula.kernels.skinny_linear import (
    HOPPER_SHARED_BYTES,
    MAX_ROWS,
    SHARED_HEADROOM_BYTES,
    row_block,
    shared_budget,
    skinny_config,
    skinny_linear,
    tma_fits,
)
from ocula.layers import linear as linear_module
from tests.kernels.test_gemv import assert_within_bound, dtypes, make

ANY_ORDER = 1  # block_k for assert_within_bound: the bound of a sum in any order


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [2, 11, 16, 17, 25, 32])
@pytest.mark.parametrize(
    "features,depth,config",
    [(64, 512, None), (70, 300, None), (21, 1000, (32, 128, 2)), (40, 2048, (16, 256, 3))],
)
def test_skinny_linear_is_within_the_float32_summation_bound(
    device: torch.device, dtype: torch.dtype, rows: int, features: int, depth: int, config
) -> None:
    """16-bit rows of 300 (600 bytes, not a multiple of 16) take pointer loads, the others
    tensor descriptors (TMA)."""
    if dtype not in dtypes(device):
        pytest.skip("bf16 runs on CUDA only (the interpreter computes bf16 wrongly)")
    x, weight, bias = make(rows, features, depth, dtype, device, seed=rows)
    if device.type == "cpu":
        assert tma_fits(weight) == (depth * x.element_size() % 16 == 0)
    for with_bias in (None, bias):
        y = skinny_linear(x, weight, with_bias, config)
        assert y.shape == (rows, features) and y.dtype == dtype
        expected_bias = None if with_bias is None else bias.cpu()
        assert_within_bound(y.cpu(), x.cpu(), weight.cpu(), expected_bias, ANY_ORDER)


def test_pointer_loads_give_what_tensor_descriptors_give(
    device: torch.device, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same tiles read either way: the same sums in the same order, so the same bits."""
    x, weight, bias = make(20, 96, 384, torch.float16, device, seed=3)
    through_tma = skinny_linear(x, weight, bias)
    monkeypatch.setattr(skinny_module, "USE_TMA", False)
    assert not tma_fits(weight)
    assert torch.equal(skinny_linear(x, weight, bias), through_tma)


def test_an_unaligned_row_start_takes_pointer_loads(device: torch.device) -> None:
    """x from an offset that is not a multiple of 16 bytes: no descriptor, the same result."""
    x, weight, bias = make(9, 48, 256, torch.float16, device, seed=5)
    storage = torch.empty(x.numel() + 1, dtype=x.dtype, device=device)
    shifted = storage[1:].view_as(x)
    shifted.copy_(x)
    assert not tma_fits(shifted)
    # A GPU before Hopper reads both by pointer.
    assert tma_fits(x) or not hopper_or_later(device.index)
    assert torch.equal(skinny_linear(shifted, weight, bias), skinny_linear(x, weight, bias))


def test_each_row_depends_on_that_row_only(device: torch.device) -> None:
    """A row's result is the same bits alone or among others with the same x tile height
    (batch invariance within a `row_block`)."""
    x, weight, bias = make(30, 48, 320, torch.float16, device, seed=7)
    for rows, single in ((12, 1), (30, 17)):
        together = skinny_linear(x[:rows], weight, bias)
        for row in (0, 5, 11):
            alone = skinny_linear(x[row : row + single].contiguous(), weight, bias)
            assert row_block(single) == row_block(rows)
            assert torch.equal(alone[0], together[row])


def test_skinny_linear_rejects_what_it_cannot_take(device: torch.device) -> None:
    x, weight, bias = make(MAX_ROWS + 1, 16, 64, torch.float32, device)
    with pytest.raises(ValueError, match="1 to 32 rows"):
        skinny_linear(x, weight)
    with pytest.raises(ValueError, match="1 to 32 rows"):
        skinny_linear(x[:0], weight)
    with pytest.raises(ValueError, match="cannot multiply"):
        skinny_linear(x[:4, :32], weight)
    with pytest.raises(ValueError, match="contiguous"):
        skinny_linear(x[:4, :16], weight[:, :16])
    with pytest.raises(ValueError, match="bias"):
        skinny_linear(x[:4], weight, bias[:4])
    with pytest.raises(ValueError, match="dtype"):
        skinny_linear(x[:4], weight.double())


@pytest.mark.parametrize(
    "features,depth",
    [(4608, 3584), (3584, 3584), (37888, 3584), (3584, 18944), (152064, 3584), (6144, 4096),
     (4096, 14336), (28672, 4096), (92544, 4096), (64, 40)],
)  # fmt: skip
def test_configs_fit_the_shared_memory_budget(features: int, depth: int) -> None:
    """The pipeline holds STAGES + 1 pairs of tiles (Triton asked for 6 x 40 KB at 5 stages of a
    (64 + 16) x 256 bf16 pair on an H100), on a Hopper (the default), an A100 and an L40, for
    every x tile height."""
    for limit in (HOPPER_SHARED_BYTES, 166_912, 101_376):
        budget = limit - SHARED_HEADROOM_BYTES
        for element_size, block_m in itertools.product((2, 4), (16, 32)):
            block_n, block_k, stages = skinny_config(features, depth, element_size, budget, block_m)
            assert block_k <= max(16, 1 << (depth - 1).bit_length())
            assert block_n <= 256 and block_k <= 256  # a tensor descriptor's box
            pair = (block_n + block_m) * block_k * element_size
            assert stages >= 1 and (stages + 1) * pair <= budget
    assert skinny_config(features, depth) == skinny_config(features, depth, 2, shared_budget(None))


def test_the_rule_on_a_hopper_is_the_one_measured() -> None:
    """The tiles of the H100 sweep with tensor descriptors (BENCHMARKS.md, eighteenth session)."""
    for block_m in (16, 32):
        assert skinny_config(4608, 3584, block_m=block_m) == (64, 128, 5)  # Qwen2.5-7B qkv
        assert skinny_config(3584, 3584, block_m=block_m) == (32, 256, 5)  # o
        assert skinny_config(37888, 3584, block_m=block_m) == (64, 128, 3)  # gate_up
        assert skinny_config(3584, 18944, block_m=block_m) == (32, 256, 5)  # down
        assert skinny_config(152064, 3584, block_m=block_m) == (64, 128, 3)  # LM head
    assert [row_block(rows) for rows in (2, 16, 17, 32)] == [16, 16, 32, 32]


def test_linear_sends_2_to_32_rows_on_the_gpu_to_the_skinny_kernel(
    device: torch.device, monkeypatch: pytest.MonkeyPatch
) -> None:
    if device.type != "cuda":
        pytest.skip("the skinny kernel serves CUDA tensors only; on CPU linear is F.linear")
    x, weight, bias = make(40, 256, 512, torch.bfloat16, device)
    for rows in (2, 9, 16, 32):
        expected = skinny_linear(x[:rows].contiguous(), weight, bias)
        got = linear_module.linear(x[:rows].view(1, rows, 512), weight, bias)  # 3-D
        assert got.shape == (1, rows, 256)
        assert torch.equal(got[0], expected)
    assert torch.equal(linear_module.linear(x[:33], weight, bias), F.linear(x[:33], weight, bias))
    monkeypatch.setattr(linear_module, "USE_SKINNY", False)
    assert torch.equal(linear_module.linear(x[:8], weight, bias), F.linear(x[:8], weight, bias))


def test_linear_keeps_several_rows_on_f_linear_off_the_gpu() -> None:
    x, weight, bias = make(8, 32, 64, torch.float32, torch.device("cpu"))
    assert not linear_module.skinny_applies(x, weight, bias)
    assert torch.equal(linear_module.linear(x, weight, bias), F.linear(x, weight, bias))


def test_the_budget_is_read_from_the_gpu_triton_runs_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA the budget is the per-block limit Triton's own launch check reads (the driver's
    MAX_SHARED_MEMORY_PER_BLOCK_OPTIN), less the headroom; here an L40's, through a stand-in."""
    asked = []

    def properties(index: int) -> dict[str, int]:
        asked.append(index)
        return {"max_shared_mem": 101_376}

    utils = types.SimpleNamespace(get_device_properties=properties)
    monkeypatch.setattr(
        triton.runtime, "driver", types.SimpleNamespace(active=types.SimpleNamespace(utils=utils))
    )
    shared_budget.cache_clear()
    try:
        assert shared_budget(3) == 101_376 - SHARED_HEADROOM_BYTES and asked == [3]
        assert shared_budget(None) == HOPPER_SHARED_BYTES - SHARED_HEADROOM_BYTES
    finally:
        shared_budget.cache_clear()
