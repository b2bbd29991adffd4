"""The test suite's faster helper calls in Triton's interpreter (`tests/helpers/triton_interpreter`)
compute what the interpreter computes without them, and patch the language once per module a
launch needs instead of once per helper call."""

from __future__ import annotations

import os

import pytest
import torch
import triton
import triton.language as tl

from tests.helpers import triton_interpreter

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="Triton's interpreter only (CPU runs)"
)


@triton.jit
def _scaled_row_sum(values, scale):
    return tl.sum(values * scale, axis=0)


@triton.jit
def _row_sums_kernel(x_ptr, out_ptr, width, block: tl.constexpr):
    row = tl.program_id(0)
    columns = tl.arange(0, block)
    values = tl.load(x_ptr + row * width + columns, mask=columns < width, other=0.0)
    total = 0.0
    for step in range(3):  # the helper called in a loop, as the GEMV kernels do
        total += _scaled_row_sum(values, step + 1.0)
    tl.store(out_ptr + row, total)


def test_helpers_called_in_a_loop_give_the_reference_and_patch_once(monkeypatch) -> None:
    from triton.runtime import interpreter

    if not triton_interpreter.install() and not getattr(
        interpreter.InterpretedFunction, "_ocula_helper_calls", False
    ):
        pytest.skip(f"written against Triton {triton_interpreter.INTERPRETER_VERSION}")
    patches: list[str] = []
    real_patch = interpreter._patch_lang

    def counting_patch(fn):
        patches.append(fn.__module__)
        return real_patch(fn)

    monkeypatch.setattr(interpreter, "_patch_lang", counting_patch)
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(0))
    out = torch.empty(5)
    _row_sums_kernel[(5,)](x, out, 24, block=32)
    torch.testing.assert_close(out, x.sum(dim=1) * 6.0)
    # The launch (this module) and `tl.sum`'s first call (it needs triton.language.core
    # patched too); without the shortcut, 5 programs × 3 calls × 2 helpers more.
    assert patches == [__name__, "triton.language.standard"], patches
