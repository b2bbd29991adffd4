"""CUDA graphs of the vision encoder, one per tile count, captured the first time it is seen.

A ViT forward over a few tiles launches hundreds of small kernels (24 layers of norms, matmuls,
attention, activations, layer scales), so for one 448px tile the launches, not the GPU, set the
time. Tile counts up to `max_tiles` run as a replayed graph instead: the pixels are copied into
the graph's static input, the graph replays, and the embeddings are copied out (the static
output is overwritten by the next replay). Larger batches run eagerly, where launch overhead is
small next to the work.

Graphs are captured lazily (a request's image sets the tile count), each after one eager warm-up
forward of the same shape (Triton compiles there, outside the capture), and they share one
memory pool: replays never overlap, and every graph's static output stays allocated. Under
vision tensor parallelism every rank of the group encodes the same tile counts in the same
order, so the ranks capture together.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from ocula.utils.device import no_garbage_collection

logger = logging.getLogger(__name__)

EncodeFn = Callable[[torch.Tensor], torch.Tensor]


class VisionGraphs:
    def __init__(self, encode_images: EncodeFn, max_tiles: int) -> None:
        self.encode_images = encode_images
        self.max_tiles = max_tiles
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._pool = None

    @torch.inference_mode()
    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Same contract as `encode_images`; the result is a fresh tensor."""
        if not pixel_values.is_cuda or pixel_values.shape[0] > self.max_tiles:
            return self.encode_images(pixel_values)
        key = (tuple(pixel_values.shape), pixel_values.dtype)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(pixel_values)
            self._graphs[key] = entry
        graph, static_input, static_output = entry
        static_input.copy_(pixel_values)
        graph.replay()
        return static_output.clone()

    def _capture(self, pixel_values: torch.Tensor) -> tuple:
        static_input = pixel_values.clone()
        self.encode_images(static_input)  # warm-up: compiles kernels, settles the allocator
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with no_garbage_collection(), torch.cuda.graph(graph, pool=self._pool):
            static_output = self.encode_images(static_input)
        self._pool = graph.pool()
        logger.info("vision encoder graph captured for %d tile(s)", pixel_values.shape[0])
        return graph, static_input, static_output
