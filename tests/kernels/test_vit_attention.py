"""The ViT attention kernel against SDPA: block tails, head sizes, dtypes, tiles, strided inputs.

On CPU the kernel runs in Triton's interpreter, so shapes stay small there; the GPU adds bf16,
head_dim 128 and InternViT's real 1025-token tiles.
"""

from __future__ import annotations

import pytest
import torch

from ocula.distributed.parallel_group import SINGLE_RANK
from ocula.kernels.vit_attention import (
    supports_head_dim,
    tail_block,
    vit_attention,
    vit_attention_reference,
)
from ocula.models import intern_vit
from ocula.models.internvl_config import InternViTConfig

# The reference runs in float32 on the same (rounded) inputs. fp32: summation order only.
# fp16/bf16: the kernel rounds the probabilities to the input dtype before P @ V and rounds
# the output; two units in the last place of the dtype at 1.0 covers both.
TOLERANCE = {
    torch.float32: {"atol": 2e-5, "rtol": 1e-5},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 1.6e-2, "rtol": 1.6e-2},
}


def dtypes(device: torch.device) -> list[torch.dtype]:
    # Triton's interpreter computes bf16 wrongly: bf16 only on the GPU.
    extra = [torch.bfloat16] if device.type == "cuda" else []
    return [torch.float32, torch.float16, *extra]


def fused_qkv(
    tiles: int, tokens: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as the model has them: strided [tiles, tokens, heads, head_dim] views of one
    [tiles, tokens, 3 * heads * head_dim] projection output."""
    generator = torch.Generator().manual_seed(tiles * 1000 + tokens + head_dim)
    qkv = torch.randn(tiles, tokens, 3 * heads * head_dim, generator=generator)
    qkv = qkv.to(device=device, dtype=dtype)
    return tuple(t.unflatten(-1, (heads, head_dim)) for t in qkv.chunk(3, dim=-1))


def assert_matches_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_m: int | None = None,
    block_n: int | None = None,
    short_tails: bool | None = None,
) -> None:
    scale = q.shape[-1] ** -0.5
    out = vit_attention(q, k, v, scale, block_m, block_n, short_tails)
    expected = vit_attention_reference(q.float(), k.float(), v.float(), scale)
    tiles, tokens, heads, head_dim = q.shape
    assert out.shape == (tiles, tokens, heads * head_dim) and out.dtype == q.dtype
    assert out.is_contiguous()
    torch.testing.assert_close(out.float(), expected, **TOLERANCE[q.dtype])


@pytest.mark.parametrize("head_dim", [16, 64])
@pytest.mark.parametrize("tokens", [1, 37, 64, 81, 129, 200])
def test_token_counts_on_and_off_the_block(
    device: torch.device, tokens: int, head_dim: int
) -> None:
    # Default blocks: 64 keys; 64 queries, or 128 for head_dim 64 at 200 tokens. Every count
    # but 64 leaves a partial key block and a partial query block; 1, 81 and 129 shrink both
    # to 16 or 32 rows (`tail_block`), 200 the key block only.
    for dtype in dtypes(device):
        assert_matches_sdpa(*fused_qkv(2, tokens, 2, head_dim, dtype, device))


@pytest.mark.parametrize(("block_m", "block_n"), [(16, 16), (32, 16), (16, 32)])
def test_many_key_blocks_with_small_blocks(
    device: torch.device, block_m: int, block_n: int
) -> None:
    # Small blocks make the online softmax rescale over many key blocks at interpreter speed.
    for dtype in dtypes(device):
        q, k, v = fused_qkv(3, 75, 2, 16, dtype, device)
        assert_matches_sdpa(q, k, v, block_m, block_n)


@pytest.mark.parametrize("short_tails", [True, False])
def test_internvit_tile_of_1025_tokens(device: torch.device, short_tails: bool) -> None:
    # 448 px tile: 32 x 32 patches + the class token, one past a multiple of every block. The
    # last query and key blocks take 16 rows, or 64 without short tails (the A/B's baseline).
    heads = 16 if device.type == "cuda" else 1
    tiles = 7 if device.type == "cuda" else 1
    for dtype in dtypes(device):
        assert_matches_sdpa(
            *fused_qkv(tiles, 1025, heads, 64, dtype, device), None, None, short_tails
        )


def test_tail_blocks_hold_the_tokens_left_in_a_power_of_two() -> None:
    assert [tail_block(tokens, 64) for tokens in (1, 15, 16, 17, 33, 64, 65, 81, 1025)] == [
        16, 16, 16, 32, 64, 64, 16, 32, 16,
    ]  # fmt: skip
    assert tail_block(1025, 128) == 16 and tail_block(1100, 128) == 128


@pytest.mark.skipif(not torch.cuda.is_available(), reason="head_dim 128 at full size on the GPU")
def test_head_dim_128_like_internvit_6b(device: torch.device) -> None:
    # InternViT-6B: 25 heads of 128 (fewer per rank under tensor parallelism).
    for heads in (25, 13):
        for dtype in dtypes(device):
            assert_matches_sdpa(*fused_qkv(5, 1025, heads, 128, dtype, device))


def test_tiles_do_not_see_each_other(device: torch.device) -> None:
    q, k, v = fused_qkv(4, 50, 2, 16, torch.float32, device)
    together = vit_attention(q, k, v, 0.25)
    for tile in range(4):
        alone = vit_attention(q[tile : tile + 1], k[tile : tile + 1], v[tile : tile + 1], 0.25)
        torch.testing.assert_close(together[tile : tile + 1], alone, rtol=0, atol=0)


def test_other_layouts_and_a_non_unit_last_stride(device: torch.device) -> None:
    heads_first = torch.randn(2, 3, 40, 32, generator=torch.Generator().manual_seed(5))
    q = heads_first.to(device).transpose(1, 2)  # [tiles, tokens, heads, dim], token stride 32
    k = torch.randn(2, 40, 3, 32, generator=torch.Generator().manual_seed(6)).to(device)
    v_transposed = torch.randn(2, 40, 3, 32, generator=torch.Generator().manual_seed(7))
    v = v_transposed.to(device).transpose(-1, -2).contiguous().transpose(-1, -2)  # last stride 40
    assert v.stride(-1) != 1
    assert_matches_sdpa(q, k, v)


def test_bad_inputs_are_rejected(device: torch.device) -> None:
    q, k, v = fused_qkv(1, 8, 1, 16, torch.float32, device)
    with pytest.raises(ValueError, match="power of two"):
        vit_attention(q[..., :12], k[..., :12], v[..., :12], 1.0)
    with pytest.raises(ValueError, match="share"):
        vit_attention(q, k.half(), v, 1.0)
    with pytest.raises(ValueError, match="tiles, tokens, heads, head_dim"):
        vit_attention(q[0], k[0], v[0], 1.0)
    # The kernel takes the row max before scaling, which holds only for a positive scale.
    for scale in (0.0, -0.125, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive"):
            vit_attention(q, k, v, scale)
    assert supports_head_dim(128) and not supports_head_dim(80) and not supports_head_dim(8)


@pytest.mark.parametrize("qk_normalization", [False, True])
def test_internvit_attention_layer_uses_the_kernel(
    device: torch.device, monkeypatch: pytest.MonkeyPatch, qk_normalization: bool
) -> None:
    config = InternViTConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=28,
        patch_size=14,
        qkv_bias=True,
        qk_normalization=qk_normalization,
    )
    layer = intern_vit.InternViTAttention(config, SINGLE_RANK)
    generator = torch.Generator().manual_seed(8)
    for param in layer.parameters():
        param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    layer.to(device)
    x = torch.randn(3, 21, 64, generator=generator).to(device)

    calls: list[int] = []

    def counting_kernel(*args: torch.Tensor, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return vit_attention(*args, **kwargs)

    with torch.inference_mode():
        monkeypatch.setattr(intern_vit, "use_triton", lambda tensor: False)
        expected = layer(x)
        # On CPU this forces the Triton path (run by the interpreter) that CUDA takes anyway.
        monkeypatch.setattr(intern_vit, "use_triton", lambda tensor: True)
        monkeypatch.setattr("ocula.kernels.vit_attention.vit_attention", counting_kernel)
        out = layer(x)
    assert calls == [1]
    torch.testing.assert_close(out, expected, **TOLERANCE[torch.float32])
