"""The ViT's Hopper attention kernel (Gluon; sm_90 only, so skipped elsewhere: Gluon has no
interpreter) against SDPA in float32 and the Triton kernel, over token counts with and without a
tail block, many work items a program, and the strided views the model passes; the model's
dispatch rule. (tests/kernels/test_sm90_compiles.py compiles it on any machine.)
"""

from __future__ import annotations

import math

import pytest
import torch

from ocula.kernels.vit_attention import vit_attention, vit_attention_reference
from ocula.models import intern_vit_attention
from ocula.models.intern_vit_attention import vision_attention, warm_up_hopper_attention
from tests.helpers.compiles import recorded_compiles
from tests.kernels.test_vit_attention import TOLERANCE, fused_qkv

LOG2E = math.log2(math.e)


def hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


on_hopper = pytest.mark.skipif(not hopper(), reason="the kernel is sm_90 (wgmma) only")


def test_tail_keys() -> None:
    from ocula.kernels.vit_attention_hopper import tail_keys

    assert [tail_keys(n) for n in (1025, 1024, 257, 200, 128, 255)] == [16, 0, 16, 128, 0, 128]


def test_declines_off_the_gpu() -> None:
    pytest.importorskip("triton.experimental.gluon")
    from ocula.kernels.vit_attention_hopper import hopper_attention_applies, hopper_vit_attention

    q, k, v = fused_qkv(1, 1025, 2, 64, torch.bfloat16, torch.device("cpu"))
    assert not hopper_attention_applies(q, k, v)
    with pytest.raises(ValueError, match="hopper_attention_applies"):
        hopper_vit_attention(q, k, v, 1.0)
    with pytest.raises(ValueError, match="positive and finite"):
        hopper_vit_attention(q, k, v, -1.0)


@on_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "tiles,tokens,heads",
    # InternViT's tiles (16-key tail); no tail; two full blocks and a tail; one full block;
    # a 72-key tail in a 128-row block; more work items than SMs, several a program
    [(2, 1025, 16), (3, 1024, 2), (1, 257, 3), (2, 128, 1), (2, 200, 2), (40, 1025, 2)],
)
def test_matches_sdpa(dtype: torch.dtype, tiles: int, tokens: int, heads: int) -> None:
    from ocula.kernels.vit_attention_hopper import hopper_attention_applies, hopper_vit_attention

    q, k, v = fused_qkv(tiles, tokens, heads, 64, dtype, torch.device("cuda"))
    assert hopper_attention_applies(q, k, v)
    scale = 64**-0.5
    out = hopper_vit_attention(q, k, v, scale * LOG2E)
    assert out.shape == (tiles, tokens, heads * 64) and out.dtype == dtype and out.is_contiguous()
    expected = vit_attention_reference(q.float(), k.float(), v.float(), scale)
    torch.testing.assert_close(out.float(), expected, **TOLERANCE[dtype])
    # The Triton kernel rounds the same way; only the sums' order differs.
    torch.testing.assert_close(out, vit_attention(q, k, v, scale), **TOLERANCE[dtype])


@on_hopper
def test_large_scores_stay_finite_and_runs_are_deterministic() -> None:
    from ocula.kernels.vit_attention_hopper import hopper_vit_attention

    q, k, v = fused_qkv(3, 1025, 2, 64, torch.bfloat16, torch.device("cuda"))
    q = q * 30  # scores of several hundred: the online softmax must rescale, not overflow
    out = hopper_vit_attention(q, k, v, 0.125 * LOG2E)
    assert torch.isfinite(out).all()
    expected = vit_attention_reference(q.float(), k.float(), v.float(), 0.125)
    torch.testing.assert_close(out.float(), expected, **TOLERANCE[torch.bfloat16])
    assert torch.equal(hopper_vit_attention(q, k, v, 0.125 * LOG2E), out)


@on_hopper
def test_applies_only_where_it_can() -> None:
    from ocula.kernels.vit_attention_hopper import hopper_attention_applies, hopper_vit_attention

    cuda = torch.device("cuda")
    q, k, v = fused_qkv(2, 1025, 2, 64, torch.bfloat16, cuda)
    assert hopper_attention_applies(q, k, v)
    assert not hopper_attention_applies(*fused_qkv(2, 1025, 2, 128, torch.bfloat16, cuda))
    assert not hopper_attention_applies(*fused_qkv(2, 100, 2, 64, torch.bfloat16, cuda))
    assert not hopper_attention_applies(*fused_qkv(2, 1025, 2, 64, torch.float32, cuda))
    swapped = q.transpose(0, 1)  # tokens before tiles: not one row-major run of tiles
    assert not hopper_attention_applies(swapped, k.transpose(0, 1), v.transpose(0, 1))
    with pytest.raises(ValueError, match="hopper_attention_applies"):
        hopper_vit_attention(q.float(), k.float(), v.float(), 1.0)


@on_hopper
def test_the_model_takes_it_eagerly_from_24_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    from ocula.kernels import vit_attention_hopper

    calls: list[int] = []
    original = vit_attention_hopper.hopper_vit_attention

    def counted(q: torch.Tensor, *args: object) -> torch.Tensor:
        calls.append(q.shape[0])
        return original(q, *args)

    monkeypatch.setattr(vit_attention_hopper, "hopper_vit_attention", counted)
    monkeypatch.setattr(intern_vit_attention, "USE_HOPPER_ATTENTION", True)
    q, k, v = fused_qkv(24, 1025, 2, 64, torch.bfloat16, torch.device("cuda"))
    out = vision_attention(q, k, v, 0.125)
    assert calls == [24]
    expected = vit_attention_reference(q.float(), k.float(), v.float(), 0.125)
    torch.testing.assert_close(out.float(), expected, **TOLERANCE[torch.bfloat16])
    vision_attention(q[:2], k[:2], v[:2], 0.125)  # eager, under 24 tiles: the Triton kernel
    monkeypatch.setattr(intern_vit_attention, "USE_HOPPER_ATTENTION", False)
    vision_attention(q, k, v, 0.125)
    assert calls == [24]


@on_hopper
def test_a_graph_capture_takes_it_from_one_tile_after_the_warm_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(intern_vit_attention, "USE_HOPPER_ATTENTION", True)
    warm_up_hopper_attention(1025, 2, 64, torch.bfloat16, torch.device("cuda"))
    q, k, v = fused_qkv(1, 1025, 2, 64, torch.bfloat16, torch.device("cuda"))
    graph = torch.cuda.CUDAGraph()
    with recorded_compiles() as compiled, torch.cuda.graph(graph):
        captured = vision_attention(q, k, v, 0.125)
    assert not compiled  # the warm-up compiled it
    graph.replay()
    torch.cuda.synchronize()
    from ocula.kernels.vit_attention_hopper import hopper_vit_attention

    assert torch.equal(captured, hopper_vit_attention(q, k, v, 0.125 * LOG2E))


@on_hopper
def test_the_consumers_turns_change_no_bit() -> None:
    """The ping-pong only orders the two consumers' MMA issues; the arithmetic is the same."""
    from ocula.kernels.vit_attention_hopper import hopper_vit_attention

    q, k, v = fused_qkv(5, 1025, 3, 64, torch.bfloat16, torch.device("cuda"))
    with_turns = hopper_vit_attention(q, k, v, 0.125 * LOG2E, turns=True)
    assert torch.equal(hopper_vit_attention(q, k, v, 0.125 * LOG2E, turns=False), with_turns)
