"""The skinny kernel (2-16 rows: small decode batches, short prefill chunks) against a float64
reference, its row independence, its configs and the dispatch in `ocula.layers.linear`.

The kernel's K sum runs inside tensor-core dots in an order the hardware picks, so the bound used
is the one for any order: K products summed, the bias added, then one rounding to the output
dtype (`assert_within_bound` with one-wide steps: n = K + 2 float32 roundings). A kernel that
multiplied float32 rows in TF32 (2^-11 per product), accumulated in 16 bits or dropped a term
would not meet it.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
import triton

from ocula.kernels.skinny_linear import (
    HOPPER_SHARED_BYTES,
    MAX_ROWS,
    SHARED_HEADROOM_BYTES,
    shared_budget,
    skinny_config,
    skinny_linear,
)
from ocula.layers import linear as linear_module
from tests.kernels.test_gemv import assert_within_bound, dtypes, make

ANY_ORDER = 1  # block_k for assert_within_bound: the bound of a sum in any order


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [2, 5, 11, 16])
@pytest.mark.parametrize(
    "features,depth,config",
    [(64, 512, None), (70, 300, None), (21, 1000, (32, 128, 2)), (40, 2048, (16, 512, 3))],
)
def test_skinny_linear_is_within_the_float32_summation_bound(
    device: torch.device, dtype: torch.dtype, rows: int, features: int, depth: int, config
) -> None:
    if dtype not in dtypes(device):
        pytest.skip("bf16 runs on CUDA only (the interpreter computes bf16 wrongly)")
    x, weight, bias = make(rows, features, depth, dtype, device, seed=rows)
    for with_bias in (None, bias):
        y = skinny_linear(x, weight, with_bias, config)
        assert y.shape == (rows, features) and y.dtype == dtype
        expected_bias = None if with_bias is None else bias.cpu()
        assert_within_bound(y.cpu(), x.cpu(), weight.cpu(), expected_bias, ANY_ORDER)


def test_each_row_depends_on_that_row_only(device: torch.device) -> None:
    """A row's result is the same bits alone or among others (batch invariance)."""
    x, weight, bias = make(12, 48, 320, torch.float16, device, seed=7)
    together = skinny_linear(x, weight, bias)
    for row in (0, 5, 11):
        alone = skinny_linear(x[row : row + 1].contiguous(), weight, bias)
        assert torch.equal(alone[0], together[row])


def test_skinny_linear_rejects_what_it_cannot_take(device: torch.device) -> None:
    x, weight, bias = make(MAX_ROWS + 1, 16, 64, torch.float32, device)
    with pytest.raises(ValueError, match="1 to 16 rows"):
        skinny_linear(x, weight)
    with pytest.raises(ValueError, match="1 to 16 rows"):
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
    (64 + 16) x 256 bf16 pair on an H100), on a Hopper (the default), an A100 and an L40."""
    for limit in (HOPPER_SHARED_BYTES, 166_912, 101_376):
        budget = limit - SHARED_HEADROOM_BYTES
        for element_size in (2, 4):
            block_n, block_k, stages = skinny_config(features, depth, element_size, budget)
            assert block_k <= max(16, 1 << (depth - 1).bit_length())
            pair = (block_n + MAX_ROWS) * block_k * element_size
            assert stages >= 1 and (stages + 1) * pair <= budget
    assert skinny_config(features, depth) == skinny_config(features, depth, 2, shared_budget(None))


def test_the_rule_on_a_hopper_is_the_one_measured() -> None:
    """The tiles of the H100 decode A/B (BENCHMARKS.md, seventeenth session)."""
    assert skinny_config(4608, 3584) == (64, 256, 4)  # Qwen2.5-7B qkv
    assert skinny_config(37888, 3584) == (64, 128, 3)  # gate_up
    assert skinny_config(3584, 18944) == (32, 512, 3)  # down
    assert skinny_config(152064, 3584) == (64, 128, 3)  # LM head


def test_linear_sends_2_to_16_rows_on_the_gpu_to_the_skinny_kernel(
    device: torch.device, monkeypatch: pytest.MonkeyPatch
) -> None:
    if device.type != "cuda":
        pytest.skip("the skinny kernel serves CUDA tensors only; on CPU linear is F.linear")
    x, weight, bias = make(40, 256, 512, torch.bfloat16, device)
    for rows in (2, 9, 16):
        expected = skinny_linear(x[:rows].contiguous(), weight, bias)
        got = linear_module.linear(x[:rows].view(1, rows, 512), weight, bias)  # 3-D
        assert got.shape == (1, rows, 256)
        assert torch.equal(got[0], expected)
    assert torch.equal(linear_module.linear(x[:17], weight, bias), F.linear(x[:17], weight, bias))
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
