"""Kernel tests: on CPU through Triton's interpreter (fp32/fp16), on GPU natively (also bf16)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
