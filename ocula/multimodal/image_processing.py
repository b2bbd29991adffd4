"""InternVL image preprocessing, bit-exact with the original OpenGVLab chat models' `load_image`.

The reference pipeline (InternVL 1.5 / 2 / 2.5 / 3 model cards) is:

1. pick a tile grid (cols, rows) with `min_num <= cols * rows <= max_num` whose aspect ratio is
   closest to the image's; on an exact tie a later (larger or equal area) grid wins only when the
   image has more than half of that grid's pixel area;
2. resize the whole image to (cols * S, rows * S) with PIL's default filter (bicubic for RGB) and
   cut it into S x S tiles, row-major;
3. if there is more than one tile and thumbnails are on, append the whole image resized to S x S;
4. per tile: convert to RGB, torchvision `Resize((S, S), BICUBIC)` (a no-op for tiles: torchvision
   returns a PIL image of the requested size unchanged), `ToTensor` (uint8 / 255 in CHW, float32),
   `Normalize` with the ImageNet mean and std.

torchvision is not needed: every step is reproduced with PIL and torch with the same operations in
the same order, so the output tensors are identical, not merely close. InternVL's tiling differs
from LightLLM's (e.g. 1920x1080 with max 12 gives a 4x2 grid + thumbnail = 9 tiles here, where
LightLLM yields 13); Ocula follows InternVL.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_MAX_TILES = 12
# The largest tile cap a request may ask for (`image_max_patch_num`): 64 tiles are 16,384 image
# tokens at InternVL's 256 per tile, and the grids to consider grow with the cube of the cap (the
# reference's loops): a cap of 10**9 once kept the server busy forever.
MAX_REQUEST_TILES = 64


@dataclass(frozen=True)
class InternVLImageConfig:
    """Tiling parameters; `max_num` is usually `resolve_max_tiles(...)` for the request."""

    image_size: int = 448  # S: tile side in pixels (the checkpoint's `force_image_size`)
    min_num: int = 1
    max_num: int = DEFAULT_MAX_TILES
    use_thumbnail: bool = True
    dynamic: bool = True  # False: one tile, the whole image resized to S x S

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"image_size must be at least 1, got {self.image_size}")
        if not 1 <= self.min_num <= self.max_num:
            raise ValueError(
                f"need 1 <= min_num <= max_num, got min_num={self.min_num}, max_num={self.max_num}"
            )


@functools.lru_cache(maxsize=64)
def candidate_grids(min_num: int, max_num: int) -> tuple[tuple[int, int], ...]:
    """Grids (cols, rows) with min_num <= cols * rows <= max_num, sorted by area (computed once
    per range: about 0.1 ms for max_num 12, spent on every request's every image before).

    Grids of equal area keep the iteration order of a set built in the reference's insertion
    order (it only matters for exact aspect-ratio ties between equal-area grids), so the set is
    filled with the same nested loops as the reference and then stably sorted.
    """
    grids: set[tuple[int, int]] = set()
    for n in range(min_num, max_num + 1):
        for cols in range(1, n + 1):
            for rows in range(1, n + 1):
                if min_num <= cols * rows <= max_num:
                    grids.add((cols, rows))
    return tuple(sorted(grids, key=lambda grid: grid[0] * grid[1]))


def tile_grid(width: int, height: int, config: InternVLImageConfig) -> tuple[int, int]:
    """The (cols, rows) grid InternVL's dynamic tiling picks for a width x height image."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    aspect_ratio = width / height
    area = width * height
    best_grid = (1, 1)
    best_distance = float("inf")
    for grid in candidate_grids(config.min_num, config.max_num):
        distance = abs(aspect_ratio - grid[0] / grid[1])
        if distance < best_distance:
            best_distance, best_grid = distance, grid
        elif (
            distance == best_distance
            and area > 0.5 * config.image_size * config.image_size * grid[0] * grid[1]
        ):
            # Exact tie: the later grid wins only when the image would fill more than half of
            # it (the same float expression as the reference).
            best_grid = grid
    return best_grid


def count_tiles(width: int, height: int, config: InternVLImageConfig) -> int:
    """Number of tiles `preprocess` returns for a width x height image, without touching pixels."""
    if not config.dynamic:
        return 1
    cols, rows = tile_grid(width, height, config)
    tiles = cols * rows
    if config.use_thumbnail and tiles != 1:
        tiles += 1
    return tiles


def resolve_max_tiles(
    request_value: int | None, env_value: int | None, config_value: int | None
) -> int:
    """Tile cap for one request: the request's `image_max_patch_num` when > 0, else the
    `MAX_PATCH_NUM` environment value (pass `ocula.env.max_patch_num()`), else the checkpoint
    config's `max_dynamic_patch`, else 12."""
    for value in (request_value, env_value, config_value):
        if value is not None and value > 0:
            return value
    return DEFAULT_MAX_TILES


def split_into_tiles(image: Image.Image, config: InternVLImageConfig) -> list[Image.Image]:
    """Step 1-3 of the reference: the tiles (row-major) and, when used, the thumbnail last.

    `image` must already be RGB: PIL's default resize filter is bicubic for RGB but nearest for
    palette and bilevel images, and the reference converts to RGB when it loads the file.

    The thumbnail is resized on a thread of its own while this one resizes and cuts the grid
    (PIL releases the GIL while it resamples): on 2 cores a 4032 x 3024 image took 110 ms
    instead of 178, a 1920 x 1080 one 31 instead of 45. Same pixels either way.
    """
    size = config.image_size
    cols, rows = tile_grid(image.width, image.height, config)
    thumbnail = None
    if config.use_thumbnail and cols * rows != 1:
        image.load()  # decoded before two threads read it
        thumbnail = _THUMBNAILS.submit(image.resize, (size, size), Image.Resampling.BICUBIC)
    resized = image.resize((cols * size, rows * size), Image.Resampling.BICUBIC)
    tiles = []
    for index in range(cols * rows):
        left = (index % cols) * size
        top = (index // cols) * size
        tiles.append(resized.crop((left, top, left + size, top + size)))
    if thumbnail is not None:
        # Not started yet (every thumbnail thread busy): made here instead of waiting.
        if thumbnail.cancel():
            tiles.append(image.resize((size, size), Image.Resampling.BICUBIC))
        else:
            tiles.append(thumbnail.result())
    return tiles


# Threads for `split_into_tiles`' thumbnails. Their jobs wait on nothing, so callers on any
# thread (the front's, the engine's tiling pool) cannot deadlock on them.
_THUMBNAILS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ocula-thumbnail")


def preprocess(image: Image.Image, config: InternVLImageConfig) -> torch.Tensor:
    """Pixel values for InternViT: float32 [num_tiles, 3, S, S], num_tiles == count_tiles(...)."""
    return normalize_pixels(tile_pixels(image, config))


def tile_pixels(image: Image.Image, config: InternVLImageConfig) -> torch.Tensor:
    """The tiles of `preprocess` before normalization: uint8 [num_tiles, 3, S, S]. The engine
    ships these (a quarter of the bytes) and normalizes them on the GPU."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    tiles = split_into_tiles(rgb, config) if config.dynamic else [rgb]
    size = config.image_size
    # torchvision's Resize((S, S), BICUBIC) on a PIL image: PIL bicubic (antialiased), skipped
    # when the image already has that size.
    tiles = [
        tile if tile.size == (size, size) else tile.resize((size, size), Image.Resampling.BICUBIC)
        for tile in tiles
    ]
    # Channels first, one plane at a time (PIL's split, numpy's copy): torch's permuted copy of
    # the same bytes ran on its thread pool, 1.0 ms for one tile on 2 cores against 0.2 here.
    pixels = np.empty((len(tiles), 3, size, size), dtype=np.uint8)
    for index, tile in enumerate(tiles):
        for channel, band in enumerate(tile.split()):
            pixels[index, channel] = np.asarray(band)
    return torch.from_numpy(pixels)


def normalize_pixels(tiles: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, S, S] tiles -> float32 pixel values, on the tiles' device.

    ToTensor: float32, divided by 255; then Normalize: subtract mean, divide by std, in float32
    and in that order. Each step is one correctly rounded IEEE operation, so CPU and CUDA give
    bit-identical results (tests/gpu checks it) -- provided every divisor is a tensor: CUDA
    divides by a Python scalar as a multiply by its reciprocal, which rounds differently.
    """
    divisor, mean, std = _normalization_constants(tiles.device)
    return tiles.to(torch.float32).div(divisor).sub_(mean).div_(std)


@functools.cache
def _normalization_constants(device: torch.device) -> tuple[torch.Tensor, ...]:
    """255, mean and std as float32 tensors on `device`, made once: a copy from the host there
    would wait for the device's queued work each time."""
    divisor = torch.full((), 255.0, dtype=torch.float32)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32)[:, None, None]
    return tuple(t.to(device) for t in (divisor, mean, std))
