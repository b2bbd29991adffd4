"""The Gluon kernels compile for sm_90 on any machine, the CPU one included: Gluon has no
interpreter, so this is what CI can check of them (their numbers are tested on a GPU). Each
compiles in a child process (`tests.helpers.sm90_compile`), and ptxas, shipped with Triton, must
report no register spills and no serialized wgmma (which would undo every overlap)."""

from __future__ import annotations

import pytest

from tests.helpers.sm90_compile import run_compile

pytest.importorskip("triton.experimental.gluon")


def test_the_vit_attention_kernel() -> None:
    """InternViT's 1025-token tiles: full 128-key blocks and a 16-key tail."""
    report = run_compile("attention")
    # Q K^T, the tail's Q K^T, P V
    assert report["wgmma_shapes"] == ["m64n128k16", "m64n16k16", "m64n64k16"]
    assert report["spill_bytes"] == 0 and not report["wgmma_serialized"]
    assert report["warps"] == 12  # a loader and two consumer warpgroups
    # P and the output rounded two at a time (`_rounded`), not as `.to()` lowers them here
    assert report["scalar_16bit_conversions"] == 0


def test_the_pingpong_gemm_with_its_activation_table() -> None:
    report = run_compile("pingpong")
    assert report["wgmma_shapes"] == ["m64n128k16"]
    assert report["spill_bytes"] == 0 and not report["wgmma_serialized"]
    assert report["warps"] == 12  # a loader and two MMA partitions
