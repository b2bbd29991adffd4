"""RMSNorm with an optional fused residual add.

Numerics follow transformers' LlamaRMSNorm exactly: normalise in float32, cast back to the input
dtype, and only then multiply by the weight (in the weight's dtype). The residual add happens in
the activation dtype before the norm, as the reference decoder layer does it.

On CUDA (`use_triton`) the Triton kernels of `ocula.kernels.rmsnorm` compute it with the same
roundings; see there for the one thing they may not reproduce (the order of the float32 sum of
squares). Elsewhere `rms_norm_reference` is the computation.
"""

from __future__ import annotations

import torch
from torch import nn

from ocula.kernels import use_triton
from ocula.layers.linear import load_replicated


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm of x over its last dim: the torch path and the kernels' oracle."""
    input_dtype = x.dtype
    x32 = x.to(torch.float32)
    variance = x32.pow(2).mean(-1, keepdim=True)
    x32 = x32 * torch.rsqrt(variance + eps)
    return weight * x32.to(input_dtype)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
        self.weight.weight_loader = load_replicated

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without `residual`: norm(x). With it: (norm(x + residual), x + residual).

        With `residual`, both inputs are consumed: the kernel path writes x + residual into
        `residual` and the normalized rows into `x` (see `fused_add_rms_norm`), so callers must
        use only the returned tensors. Without it, x is left as it is.
        """
        if use_triton(x):
            from ocula.kernels.rmsnorm import fused_add_rms_norm, rms_norm

            if residual is None:
                return rms_norm(x, self.weight, self.eps)
            return fused_add_rms_norm(x, residual, self.weight, self.eps)
        if residual is None:
            return rms_norm_reference(x, self.weight, self.eps)
        summed = x + residual
        return rms_norm_reference(summed, self.weight, self.eps), summed
