"""Which kernel runs the InternViT's attention on a GPU: on Hopper the Gluon kernel of
`ocula.kernels.vit_attention_hopper` (its softmax under the next block's tensor-core work),
elsewhere, or where its conditions fail, the Triton kernel of `ocula.kernels.vit_attention`.
Both compute the same function to float32 sums and one rounding of P and of the output.

A Gluon launch holds the host longer than a Triton one, so the Hopper kernel follows the launch
rule of the ViT's other Gluon kernel (`intern_vit_linear.gluon_launch_pays`): inside CUDA-graph
captures from one tile, eagerly from 24.
"""

from __future__ import annotations

import functools
import logging
import math

import torch

from ocula.models.intern_vit_linear import gluon_launch_pays

logger = logging.getLogger(__name__)

# A constant; the benchmarks' `--switches hopper_attention=on|off` set it for an A/B. Off by
# default: on an H100 the kernel took 10.0 ms of a 32-tile forward against the Triton kernel's
# 9.0 (BENCHMARKS.md, thirty-first session).
USE_HOPPER_ATTENTION = False


def vision_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """softmax(q k^T * scale) v per (tile, head): q, k, v [tiles, tokens, heads, head_dim] views
    of the qkv projection on a CUDA device -> [tiles, tokens, heads * head_dim]."""
    if _takes_hopper_kernel(q, k, v):
        from ocula.kernels.vit_attention_hopper import hopper_vit_attention

        return hopper_vit_attention(q, k, v, scale * math.log2(math.e))
    from ocula.kernels.vit_attention import vit_attention

    return vit_attention(q, k, v, scale)


def warm_up_hopper_attention(
    tokens: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
) -> None:
    """Compiles the Hopper kernel for the tiles' token count now (start-up), not inside the
    first graph capture or large batch; a failure turns it off with a warning."""
    global _failed_warm_up
    if not (USE_HOPPER_ATTENTION and device.type == "cuda" and kernel_importable()):
        return
    from ocula.kernels.vit_attention_hopper import hopper_attention_applies, hopper_vit_attention

    qkv = torch.zeros(1, tokens, 3, heads, head_dim, dtype=dtype, device=device)
    q, k, v = qkv.unbind(2)
    if not hopper_attention_applies(q, k, v):
        return
    try:
        hopper_vit_attention(q, k, v, 1.0)
    except Exception as error:  # an optional kernel: the Triton one stays
        _failed_warm_up = f"{type(error).__name__}: {error}"
        logger.warning("the ViT's Hopper attention is off (it failed at start-up): %s",
                       _failed_warm_up)  # fmt: skip


# Why the Hopper kernel is off for this process, if its warm-up failed.
_failed_warm_up: str | None = None


@functools.cache
def kernel_importable() -> bool:
    """Whether this Triton has Gluon's Hopper API (the kernel was written against Triton 3.6)."""
    try:
        import ocula.kernels.vit_attention_hopper  # noqa: F401
    except ImportError:
        return False
    return True


def _takes_hopper_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    if not (USE_HOPPER_ATTENTION and q.is_cuda) or _failed_warm_up or not kernel_importable():
        return False
    if not gluon_launch_pays(q.shape[0] * q.shape[1]):
        return False
    from ocula.kernels.vit_attention_hopper import hopper_attention_applies

    return hopper_attention_applies(q, k, v)
