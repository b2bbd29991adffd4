"""Runs the vision encoder for a step's cache misses, data-parallel over the ViT groups.

Every rank calls `encode` with the same plan. With one ViT group (`visual_dp = 1`) all ranks
encode every image together (tensor parallel inside the model). With several groups the images
are dealt out by `assign_images`, each group encodes its share in batches of at most
`visual_infer_batch_size` images, and the first rank of each group broadcasts its share's
embeddings to every rank, since every LLM rank needs all of them. Shapes are known on every
rank from the plan (tiles x tokens per tile), so no sizes travel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ocula.config import EngineArgs
from ocula.distributed.parallel_group import ParallelGroup
from ocula.distributed.vision_groups import VisionLayout, assign_images
from ocula.engine.image_inputs import EncoderInput
from ocula.engine.vision_graphs import VisionGraphs
from ocula.multimodal.image_processing import normalize_pixels
from ocula.utils.device import cat_to_device_async

EncodeFn = Callable[[torch.Tensor], torch.Tensor]  # [tiles, 3, S, S] -> [tiles, tokens, hidden]


class ImageEncoder:
    def __init__(
        self,
        encode_images: EncodeFn,
        tokens_per_tile: int,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
        batch_size: int,
        world: ParallelGroup,
        layout: VisionLayout,
    ) -> None:
        self.encode_images = encode_images
        self.tokens_per_tile = tokens_per_tile
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.device = device
        self.batch_size = batch_size
        self.world = world
        self.layout = layout
        self.batch_sizes: list[int] = []  # images per ViT forward run by this rank's group

    def encode(self, inputs: list[EncoderInput]) -> dict[str, torch.Tensor]:
        """Embeddings [tiles * tokens_per_tile, hidden] of every input, by cache key."""
        if not inputs:
            return {}
        if self.layout.dp == 1:
            return self._encode_share(inputs)
        owners = assign_images([item.pixel_values.shape[0] for item in inputs], self.layout.dp)
        mine = self.layout.group_of(self.world.rank)
        result: dict[str, torch.Tensor] = {}
        for group in range(self.layout.dp):
            share = [item for item, owner in zip(inputs, owners, strict=True) if owner == group]
            if not share:
                continue
            if group == mine:
                encoded = self._encode_share(share)
                flat = torch.cat([encoded[item.key] for item in share])
            else:
                rows = sum(item.pixel_values.shape[0] for item in share) * self.tokens_per_tile
                flat = torch.empty((rows, self.hidden_size), dtype=self.dtype, device=self.device)
            self.world.broadcast(flat, src=self.layout.leader_of(group))
            sizes = [item.pixel_values.shape[0] * self.tokens_per_tile for item in share]
            for item, part in zip(share, flat.split(sizes), strict=True):
                result[item.key] = part
        return result

    def _encode_share(self, inputs: list[EncoderInput]) -> dict[str, torch.Tensor]:
        parts = [item.pixel_values for item in inputs]
        if len({part.dtype for part in parts}) > 1:  # a cat would promote uint8 unscaled
            parts = [normalize_pixels(p) if p.dtype == torch.uint8 else p for p in parts]
        # Every image of the share in one transfer (see `cat_to_device_async`); each batch is
        # then normalized and cast on its own, so the float copies never exceed one batch.
        pixels = cat_to_device_async(parts, self.device)
        tiles = [item.pixel_values.shape[0] for item in inputs]
        result: dict[str, torch.Tensor] = {}
        first_tile = 0
        for first in range(0, len(inputs), self.batch_size):
            group = inputs[first : first + self.batch_size]
            group_tiles = tiles[first : first + self.batch_size]
            batch = pixels[first_tile : first_tile + sum(group_tiles)]
            first_tile += batch.shape[0]
            if batch.dtype == torch.uint8:  # tiles as preprocess_span gives them
                batch = normalize_pixels(batch)
            features = self.encode_images(batch.to(self.dtype))
            for item, per_image in zip(group, features.split(group_tiles), strict=True):
                result[item.key] = per_image.reshape(-1, per_image.shape[-1])
            self.batch_sizes.append(len(group))
        return result

    def take_batch_sizes(self) -> list[int]:
        sizes, self.batch_sizes = self.batch_sizes, []
        return sizes


# Vision-encoder forwards of up to this many tiles replay a CUDA graph (one image of up to 12
# tiles plus its thumbnail fits); larger batches run eagerly.
VISION_GRAPH_MAX_TILES = 16


def build_image_encoder(
    model: nn.Module,
    args: EngineArgs,
    tp: ParallelGroup,
    layout: VisionLayout,
    dtype: torch.dtype,
    device: torch.device,
) -> ImageEncoder:
    """The encoder of a vision model's image tiles: on CUDA its graphs captured, or its kernels
    compiled, now rather than in the first image's step (collective under vision tensor
    parallelism)."""
    encode = model.encode_images
    config = model.config
    tile = (config.vision_config.num_channels, config.image_size, config.image_size)
    if device.type == "cuda" and hasattr(model, "warm_up_kernels"):
        # Paths only large batches or graph captures take (built before any capture).
        with torch.inference_mode():
            model.warm_up_kernels(dtype, device)
    if device.type == "cuda" and not args.disable_cudagraph:
        encode = VisionGraphs(encode, tile, dtype, device, VISION_GRAPH_MAX_TILES)
        encode.capture()
    elif device.type == "cuda":
        with torch.inference_mode():
            encode(torch.zeros((1, *tile), dtype=dtype, device=device))
    return ImageEncoder(
        encode,
        model.tokens_per_tile,
        config.text_config.hidden_size,
        dtype,
        device,
        args.visual_infer_batch_size,
        tp,
        layout,
    )
