"""The Hopper kernels compile for sm_90 on any machine, the CPU one included: Gluon has no
interpreter, and the interpreter that runs the Triton kernels in CI skips the GPU compiler, so
this is what CI can check of their GPU code (their numbers are tested on a GPU). Each compiles
in a child process (`tests.helpers.sm90_compile`), and ptxas, shipped with Triton, must report
no register spills and no serialized wgmma (which would undo every overlap)."""

from __future__ import annotations

import pytest

from tests.helpers.sm90_compile import run_compile

pytest.importorskip("triton.experimental.gluon")


def test_the_vit_attention_kernel_with_its_short_tails() -> None:
    """The Triton kernel at InternViT's 1025-token tiles: 64-row blocks and 16-row tails."""
    report = run_compile("vit_attention")
    # Q K^T and P V of the full blocks (wgmma); the 16-key tail's Q K^T. The 16-query tail
    # block is below wgmma's 64 rows and takes mma.sync.
    assert report["wgmma_shapes"] == ["m64n16k16", "m64n64k16"]
    assert report["spill_bytes"] == 0 and not report["wgmma_serialized"]
    assert report["warps"] == 4


def test_the_pingpong_gemm_with_its_activation_table() -> None:
    report = run_compile("pingpong")
    assert report["wgmma_shapes"] == ["m64n128k16"]
    assert report["spill_bytes"] == 0 and not report["wgmma_serialized"]
    assert report["warps"] == 12  # a loader and two MMA partitions
