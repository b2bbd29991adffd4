"""RMSNorm with an optional fused residual add.

Numerics follow transformers' LlamaRMSNorm exactly: normalise in float32, cast back to the input
dtype, and only then multiply by the weight (in the weight's dtype). The residual add happens in
the activation dtype before the norm, as the reference decoder layer does it.
"""

from __future__ import annotations

import torch
from torch import nn

from ocula.layers.linear import load_replicated


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
        self.weight.weight_loader = load_replicated

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x32 = x.to(torch.float32)
        variance = x32.pow(2).mean(-1, keepdim=True)
        x32 = x32 * torch.rsqrt(variance + self.eps)
        return self.weight * x32.to(input_dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without `residual`: norm(x). With it: (norm(x + residual), x + residual)."""
        if residual is None:
            return self._normalize(x)
        summed = x + residual
        return self._normalize(summed), summed
