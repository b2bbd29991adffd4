"""Activations of gated MLPs.

On CUDA (`use_triton`) the Triton kernel `ocula.kernels.activation.silu_and_mul` computes
`silu_and_mul_reference` bit for bit in one pass; elsewhere the reference runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ocula.kernels import use_triton


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """x = [gate | up] along the last dim (equal halves) -> silu(gate) * up, in x's dtype."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


class SiluAndMul(nn.Module):
    """x = [gate | up] along the last dim (equal halves) -> silu(gate) * up."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_triton(x):
            from ocula.kernels.activation import silu_and_mul

            return silu_and_mul(x)
        return silu_and_mul_reference(x)
