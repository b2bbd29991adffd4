"""The ping-pong GEMM (Gluon, Hopper only: skipped elsewhere, Gluon has no interpreter) against
a float64 reference, its table lookup against the separate table pass and torch's CUDA GELU bit
for bit, and the ViT's fc1 dispatch to it.

The K sum runs inside wgmma instructions in an order the hardware picks, so the bound is the one
for any order (`assert_within_bound` with one-wide steps). The lookup must give exactly the
table's entry for the GEMM's own rounded output, on every 16-bit pattern.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ocula.distributed.parallel_group import SINGLE_RANK
from ocula.kernels.table_activation import activation_table, table_activation_
from ocula.layers.linear import ColumnParallelLinear
from ocula.models import intern_vit_linear
from ocula.models.intern_vit_linear import fc1_with_table_activation, warm_up_fc1_kernel
from tests.helpers.compiles import recorded_compiles
from tests.kernels.test_gemv import assert_within_bound, make
from tests.kernels.test_table_activation import bits, every_pattern

ANY_ORDER = 1


def hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


pytestmark = pytest.mark.skipif(not hopper(), reason="the ping-pong GEMM is sm_90 (wgmma) only")

if hopper():
    from ocula.kernels.pingpong_linear import pingpong_applies, pingpong_linear


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "rows,features,depth",
    # whole tiles; row, feature and depth tails; a program with one tile; more tiles than SMs
    [(256, 256, 512), (1025, 384, 1024), (77, 136, 1000), (1, 8, 8), (4100, 1024, 256)],
)
def test_within_the_float32_summation_bound(
    dtype: torch.dtype, rows: int, features: int, depth: int
) -> None:
    x, weight, bias = make(rows, features, depth, dtype, torch.device("cuda"), seed=rows)
    for with_bias in (None, bias):
        y = pingpong_linear(x, weight, with_bias)
        assert y.shape == (rows, features) and y.dtype == dtype
        expected_bias = None if with_bias is None else bias.cpu()
        assert_within_bound(y.cpu(), x.cpu(), weight.cpu(), expected_bias, ANY_ORDER)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_table_maps_every_pattern(dtype: torch.dtype) -> None:
    """x = 0 and W = 0, so output column n is GELU(0 + bias[n]) with the bias running through
    every 16-bit pattern (NaNs, infinities and subnormals included)."""
    patterns = every_pattern(dtype, torch.device("cuda"))
    x = torch.zeros(3, 64, dtype=dtype, device="cuda")
    weight = torch.zeros(patterns.numel(), 64, dtype=dtype, device="cuda")
    table = activation_table(F.gelu, dtype, torch.device("cuda"))
    got = pingpong_linear(x, weight, patterns, activation_table=table)
    expected = F.gelu(torch.zeros_like(patterns) + patterns)  # -0 + 0 is +0, as in the kernel
    for row in got:
        assert torch.equal(bits(row), bits(expected))


@pytest.mark.parametrize("rows,features,depth", [(1025, 4096, 1024), (300, 520, 136)])
def test_table_in_the_epilogue_equals_the_table_pass(rows: int, features: int, depth: int) -> None:
    x, weight, bias = make(rows, features, depth, torch.bfloat16, torch.device("cuda"), seed=2)
    table = activation_table(F.gelu, torch.bfloat16, torch.device("cuda"))
    activated = pingpong_linear(x, weight, bias, activation_table=table)
    separate = table_activation_(pingpong_linear(x, weight, bias), F.gelu)
    assert torch.equal(bits(activated), bits(separate))


def test_runs_are_deterministic() -> None:
    x, weight, bias = make(2050, 1024, 1024, torch.bfloat16, torch.device("cuda"), seed=4)
    table = activation_table(F.gelu, torch.bfloat16, torch.device("cuda"))
    first = pingpong_linear(x, weight, bias, activation_table=table)
    assert torch.equal(pingpong_linear(x, weight, bias, activation_table=table), first)


def test_applies_only_where_it_can() -> None:
    x, weight, bias = make(64, 64, 64, torch.bfloat16, torch.device("cuda"))
    assert pingpong_applies(x, weight, bias) and pingpong_applies(x, weight, None)
    assert not pingpong_applies(x.float(), weight.float(), bias.float())  # 16-bit only
    assert not pingpong_applies(x.t(), weight, bias)  # not contiguous
    assert not pingpong_applies(x[:, :60].contiguous(), weight[:, :60].contiguous(), bias)
    assert not pingpong_applies(x.cpu(), weight.cpu(), bias.cpu())
    shifted = torch.empty(x.numel() + 1, dtype=x.dtype, device="cuda")[1:].view_as(x)
    assert shifted.is_contiguous() and not pingpong_applies(shifted, weight, bias)
    with pytest.raises(ValueError, match="pingpong_applies"):
        pingpong_linear(x.float(), weight.float())
    with pytest.raises(ValueError, match="65,536"):
        pingpong_linear(x, weight, bias, activation_table=torch.zeros(10, dtype=torch.int16))


def make_fc1(depth: int = 256, features: int = 512) -> ColumnParallelLinear:
    torch.manual_seed(0)
    fc1 = ColumnParallelLinear(depth, features, True, SINGLE_RANK).cuda().bfloat16()
    torch.nn.init.normal_(fc1.weight, std=0.05)
    torch.nn.init.normal_(fc1.bias)
    return fc1


def fused_reference(fc1: ColumnParallelLinear, x: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    return F.gelu(pingpong_linear(rows, fc1.weight, fc1.bias)).view(*x.shape[:-1], -1)


def test_the_vit_fc1_takes_it_eagerly_from_24_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    fc1 = make_fc1()
    x = torch.randn(24, 1025, 256, dtype=torch.bfloat16, device="cuda")
    activated = fc1_with_table_activation(fc1, x, F.gelu)
    assert activated is not None and activated.shape == (24, 1025, 512)
    assert torch.equal(bits(activated), bits(fused_reference(fc1, x)))
    reference = F.gelu(fc1(x)).float()  # cuBLAS: the same float32 sums, up to their order
    assert (activated.float() - reference).abs().max() <= reference.abs().max() / 64
    assert fc1_with_table_activation(fc1, x[:2], F.gelu) is None  # eager, under 24 tiles
    monkeypatch.setattr(intern_vit_linear, "USE_PINGPONG", False)
    assert fc1_with_table_activation(fc1, x, F.gelu) is None


def test_a_graph_capture_takes_it_from_one_tile_after_the_warm_up() -> None:
    fc1 = make_fc1(depth=192, features=256)
    warm_up_fc1_kernel(fc1, F.gelu)  # builds the table, compiles the kernel (or finds it)
    x = torch.randn(1, 1025, 192, dtype=torch.bfloat16, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with recorded_compiles() as compiled, torch.cuda.graph(graph):
        captured = fc1_with_table_activation(fc1, x, F.gelu)
    assert captured is not None and not compiled  # nothing compiled inside the capture
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(bits(captured), bits(fused_reference(fc1, x)))


def test_a_failed_warm_up_turns_the_kernel_off(monkeypatch: pytest.MonkeyPatch) -> None:
    import ocula.kernels.pingpong_linear as pingpong_module

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("this Triton cannot compile it")

    monkeypatch.setattr(pingpong_module, "pingpong_linear", broken)
    monkeypatch.setattr(intern_vit_linear, "_failed_warm_up", None)
    fc1 = make_fc1()
    warm_up_fc1_kernel(fc1, F.gelu)  # logs a warning instead of raising
    assert "cannot compile" in intern_vit_linear._failed_warm_up
    x = torch.randn(24, 1025, 256, dtype=torch.bfloat16, device="cuda")
    assert fc1_with_table_activation(fc1, x, F.gelu) is None  # the layers' own path stays
