"""CUDA graphs of the vision encoder, one per tile count, all captured at start-up.

A ViT forward over a few tiles launches hundreds of small kernels (24 layers of norms, matmuls,
attention, activations, layer scales), so for one 448px tile the launches, not the GPU, set the
time. Forwards of 1 to `max_tiles` tiles run as a replayed graph instead: the pixels are copied
into the static input, the graph replays, and the embeddings are copied out of the static
output. Larger batches, and tiles of another shape or dtype, run eagerly, where launch overhead
is small next to the work.

`capture` records every tile count before serving, largest first, each after one eager warm-up
forward of its shape (Triton compiles there, outside the capture). Captured on first use
instead, the first image of each new tile count paid ~2 s (kernel compiles and the capture) on
an H200 (BENCHMARKS.md). The graphs share one memory pool (replays never overlap), one static
input and one static output, each graph reading and writing its first rows, so what stays
allocated is the largest forward's activations plus one max-size input and output. Under
vision tensor parallelism every rank of the group captures the same counts in the same order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from ocula.utils.device import no_garbage_collection, replay_once

logger = logging.getLogger(__name__)

EncodeFn = Callable[[torch.Tensor], torch.Tensor]


class VisionGraphs:
    def __init__(
        self,
        encode_images: EncodeFn,
        tile_shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        max_tiles: int,
    ) -> None:
        """`tile_shape`: one tile's (channels, height, width) as the encoder is fed; graphs cover
        [1..max_tiles, *tile_shape] tiles of `dtype` once `capture` has run."""
        self.encode_images = encode_images
        self.tile_shape = tuple(tile_shape)
        self.dtype = dtype
        self.max_tiles = max_tiles
        self._input = torch.zeros((max_tiles, *self.tile_shape), dtype=dtype, device=device)
        self._output: torch.Tensor | None = None
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}

    @torch.inference_mode()
    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Same contract as `encode_images`; the result is a fresh tensor."""
        tiles = pixel_values.shape[0]
        graph = self._graphs.get(tiles)
        if (
            graph is None
            or tuple(pixel_values.shape[1:]) != self.tile_shape
            or pixel_values.dtype != self.dtype
            or pixel_values.device != self._input.device
        ):
            return self.encode_images(pixel_values)
        self._input[:tiles].copy_(pixel_values)
        graph.replay()
        return self._output[:tiles].clone()

    @torch.inference_mode()
    def capture(self) -> None:
        """Captures a graph for every tile count (collective under vision tensor parallelism)."""
        started = time.perf_counter()
        # The largest forward first: its warm-up sizes the output, and the smaller captures
        # reuse the pool blocks it leaves. One collection for all of them: each costs a walk
        # over the whole heap (0.28 s on an H100 host, 16 of them were 4.5 s of the start).
        with no_garbage_collection():
            for tiles in range(self.max_tiles, 0, -1):
                self._graphs[tiles] = self._capture(tiles)
        replay_once(self._graphs.values())
        logger.info(
            "vision encoder graphs captured for 1-%d tiles in %.2f s",
            self.max_tiles,
            time.perf_counter() - started,
        )

    def _capture(self, tiles: int) -> torch.cuda.CUDAGraph:
        pixels = self._input[:tiles]
        warm = self.encode_images(pixels)  # compiles kernels, settles the allocator
        if self._output is None:
            self._output = torch.empty(
                (self.max_tiles, *warm.shape[1:]), dtype=warm.dtype, device=warm.device
            )
        del warm
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        pool = next(iter(self._graphs.values())).pool() if self._graphs else None
        with torch.cuda.graph(graph, pool=pool):
            # The encoder's own output is freed after the copy; later captures may reuse it.
            self._output[:tiles].copy_(self.encode_images(pixels))
        return graph
