"""Capture of piecewise CUDA graphs: a stand-in attention backend that cuts the graph at every
attention call (see `piecewise_graphs` for how the pieces are replayed).

At each call `PieceRecorder.attend` copies q into a static buffer (still inside the current piece),
ends the piece, records the call and begins the next piece, returning a static output buffer.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ocula.engine.forward_batch import ForwardBatch


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
        static_q, static_out = self._buffers_for(q)
        static_q = static_q[: q.shape[0]]
        static_q.copy_(q)  # captured in the piece that ends here
        self.end_piece()
        call = AttentionCall(
            static_q, k_cache, v_cache, scale, sliding_window, static_out[: q.shape[0]]
        )
        self.calls.append(call)
        self.begin_piece()
        return call.out

    def _buffers_for(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (tuple(q.shape[1:]), q.dtype)
        if key not in self.buffers:
            raise RuntimeError(f"no static attention buffers for q {tuple(q.shape)} {q.dtype}")
        return self.buffers[key]
