"""Capture of piecewise CUDA graphs: a stand-in attention backend that cuts the graph at every
attention call (see `piecewise_graphs` for how the pieces are replayed).

At each call `PieceRecorder.attend` copies q into a static buffer (still inside the current piece),
ends the piece, records the call and begins the next piece, returning a static output buffer.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from ocula.engine.forward_batch import ForwardBatch


def buffers_for(
    buffers: dict[tuple, tuple[torch.Tensor, torch.Tensor]], q: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The static (q, attention output) buffers, [max_tokens, heads, head_dim], for q's shape."""
    key = (tuple(q.shape[1:]), q.dtype)
    if key not in buffers:
        raise RuntimeError(f"no static attention buffers for q {tuple(q.shape)} {q.dtype}")
    return buffers[key]


@dataclass
class AttentionCall:
    """One attention call between two pieces, replayed eagerly on the pieces' static tensors."""

    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    scale: float
    sliding_window: int | None
    out: torch.Tensor


@dataclass
class CapturedBucket:
    """One bucket's pieces, the attention calls between them, and its output."""

    pieces: list[torch.cuda.CUDAGraph]  # one more than calls
    calls: list[AttentionCall]
    hidden: torch.Tensor  # [size, hidden]: the final hidden states the last piece writes


class PieceRecorder:
    """Stands in for the attention backend while one bucket is captured (see the module doc)."""

    def __init__(self, pool: tuple | None) -> None:
        self.pool = pool
        self.pieces: list[torch.cuda.CUDAGraph] = []
        self.calls: list[AttentionCall] = []
        self.buffers: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._graph: torch.cuda.CUDAGraph | None = None

    def begin_piece(self) -> None:
        self._graph = torch.cuda.CUDAGraph()
        self._graph.capture_begin(pool=self.pool)

    def close_open_piece(self) -> None:
        """Ends a capture an error left open, so the stream leaves capture mode."""
        if self._graph is not None:
            with contextlib.suppress(RuntimeError):  # the failed capture may be invalidated
                self._graph.capture_end()
            self._graph = None

    def end_piece(self) -> None:
        self._graph.capture_end()
        self.pool = self._graph.pool()
        self.pieces.append(self._graph)
        self._graph = None

    def attend(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        batch: ForwardBatch,
        scale: float,
        sliding_window: int | None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        static_q, static_out = buffers_for(self.buffers, q)
        static_q = static_q[: q.shape[0]]
        static_q.copy_(q)  # captured in the piece that ends here
        self.end_piece()
        call = AttentionCall(
            static_q, k_cache, v_cache, scale, sliding_window, static_out[: q.shape[0]]
        )
        self.calls.append(call)
        self.begin_piece()
        return call.out


class StaticOutputBackend:
    """The real attention backend, writing into the pieces' shared static output buffer: used while
    a whole-step graph is captured, so that its padding rows (no sequence covers them) hold
    finite values from earlier steps rather than whatever uninitialised memory the graph pool
    gave the output. Layers share the buffer as the pieces do: each layer's output projection
    reads it before the next layer's attention writes it."""

    def __init__(
        self, backend: Any, buffers: dict[tuple, tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        self.backend = backend
        self.buffers = buffers

    def attend(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        batch: ForwardBatch,
        scale: float,
        sliding_window: int | None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        static_out = buffers_for(self.buffers, q)[1][: q.shape[0]]
        return self.backend.attend(
            q, k_cache, v_cache, batch, scale, sliding_window, out=static_out
        )
