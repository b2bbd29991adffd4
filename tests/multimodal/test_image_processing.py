"""InternVL tiling and normalization against a plain re-statement of the reference algorithm.

The reference below follows the OpenGVLab model cards' `load_image` step by step (set of grids,
closest-ratio search with its tie rule, resize + row-major crops + thumbnail, then per tile:
RGB, torchvision-style Resize, ToTensor, Normalize). It is deliberately naive and per-tile so a
vectorization or ordering mistake in `ocula` shows up as a bitwise difference.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
import torch
from PIL import Image

from ocula import env
from ocula.multimodal.image_processing import (
    InternVLImageConfig,
    candidate_grids,
    count_tiles,
    preprocess,
    resolve_max_tiles,
    tile_grid,
)


def reference_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    pairs = set()
    for n in range(min_num, max_num + 1):
        for i in range(1, n + 1):
            for j in range(1, n + 1):
                if i * j <= max_num and i * j >= min_num:
                    pairs.add((i, j))
    return sorted(pairs, key=lambda pair: pair[0] * pair[1])


def reference_closest(ratio: float, grids, width: int, height: int, size: int) -> tuple[int, int]:
    best_diff = float("inf")
    best = (1, 1)
    for grid in grids:
        diff = abs(ratio - grid[0] / grid[1])
        if diff < best_diff:
            best_diff = diff
            best = grid
        elif diff == best_diff and width * height > 0.5 * size * size * grid[0] * grid[1]:
            best = grid
    return best


def reference_tiles(image: Image.Image, min_num: int, max_num: int, size: int, thumb: bool):
    width, height = image.size
    grid = reference_closest(width / height, reference_grids(min_num, max_num), width, height, size)
    target_width, target_height = size * grid[0], size * grid[1]
    resized = image.resize((target_width, target_height))  # PIL default: bicubic for RGB
    per_row = target_width // size
    tiles = []
    for i in range(grid[0] * grid[1]):
        box = (
            (i % per_row) * size,
            (i // per_row) * size,
            (i % per_row + 1) * size,
            (i // per_row + 1) * size,
        )
        tiles.append(resized.crop(box))
    if thumb and len(tiles) != 1:
        tiles.append(image.resize((size, size)))
    return tiles


def reference_transform(tile: Image.Image, size: int) -> torch.Tensor:
    if tile.mode != "RGB":
        tile = tile.convert("RGB")
    if tile.size != (size, size):  # torchvision Resize returns the image as is when sized already
        tile = tile.resize((size, size), Image.Resampling.BICUBIC)
    array = np.array(tile, dtype=np.uint8)
    tensor = torch.from_numpy(array).view(size, size, 3).permute(2, 0, 1).contiguous()
    tensor = tensor.to(dtype=torch.float32).div(255)
    mean = torch.as_tensor((0.485, 0.456, 0.406), dtype=torch.float32)
    std = torch.as_tensor((0.229, 0.224, 0.225), dtype=torch.float32)
    return tensor.sub_(mean[:, None, None]).div_(std[:, None, None])


def reference_pixel_values(image, min_num=1, max_num=12, size=448, thumb=True) -> torch.Tensor:
    image = image.convert("RGB")  # the reference converts when it opens the file
    tiles = reference_tiles(image, min_num, max_num, size, thumb)
    return torch.stack([reference_transform(tile, size) for tile in tiles])


@cache
def noise_image(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(width * 100_003 + height)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


SIZES = [
    (1, 1),  # tiny
    (5, 3),
    (448, 448),
    (449, 448),
    (1000, 1000),  # square: the tie rule picks the 3x3 grid
    (1920, 1080),
    (2000, 200),  # panoramic 10:1
    (200, 2000),  # tall 1:10
    (4032, 3024),  # huge (phone photo)
]


@pytest.mark.parametrize("width,height", SIZES)
@pytest.mark.parametrize("max_num", [1, 6, 12])
def test_preprocess_matches_reference(width, height, max_num):
    image = noise_image(width, height)
    expected = reference_pixel_values(image, max_num=max_num, thumb=True)
    grid = reference_closest(width / height, reference_grids(1, max_num), width, height, 448)
    tiles = grid[0] * grid[1]
    for use_thumbnail in (True, False):
        config = InternVLImageConfig(max_num=max_num, use_thumbnail=use_thumbnail)
        actual = preprocess(image, config)
        # Without a thumbnail the reference yields the same tiles minus the last one.
        wanted = expected if use_thumbnail or tiles == 1 else expected[:tiles]
        assert actual.dtype == torch.float32
        assert actual.shape == wanted.shape
        assert torch.equal(actual, wanted)
        assert count_tiles(width, height, config) == wanted.shape[0]
        assert tile_grid(width, height, config) == grid


@pytest.mark.parametrize("min_num,max_num,size", [(2, 6, 64), (4, 9, 32), (1, 40, 16)])
def test_other_tile_sizes_and_min_num(min_num, max_num, size):
    config = InternVLImageConfig(image_size=size, min_num=min_num, max_num=max_num)
    for width, height in [(300, 100), (100, 301), (128, 128), (500, 40)]:
        image = noise_image(width, height)
        expected = reference_pixel_values(image, min_num, max_num, size)
        assert torch.equal(preprocess(image, config), expected)
        assert count_tiles(width, height, config) == expected.shape[0]


def test_candidate_grid_order_matches_reference_set_order():
    # Equal-area grids keep the reference's set iteration order (it differs from a plain
    # comprehension from max_num 16 on), which decides exact ties between them.
    for min_num in range(1, 25):
        for max_num in range(min_num, 25):
            assert list(candidate_grids(min_num, max_num)) == reference_grids(min_num, max_num)


def test_known_tile_counts():
    config = InternVLImageConfig()
    assert tile_grid(1920, 1080, config) == (4, 2)  # (2, 1) ties with (4, 2); the larger wins
    assert count_tiles(1920, 1080, config) == 9  # 8 tiles + thumbnail (LightLLM gives 13)
    assert count_tiles(1920, 1080, InternVLImageConfig(use_thumbnail=False)) == 8
    assert count_tiles(448, 448, config) == 1  # one tile: no thumbnail
    assert count_tiles(449, 448, config) == 1
    assert count_tiles(1000, 1000, config) == 10  # 3x3 + thumbnail
    assert count_tiles(4000, 400, config) == 11  # 10x1 + thumbnail
    assert count_tiles(1920, 1080, InternVLImageConfig(max_num=1)) == 1
    assert count_tiles(1920, 1080, InternVLImageConfig(dynamic=False)) == 1


def test_non_dynamic_is_one_resized_tile():
    image = noise_image(640, 480)
    config = InternVLImageConfig(dynamic=False)
    expected = reference_transform(image, 448)[None]
    assert torch.equal(preprocess(image, config), expected)


def test_non_rgb_input_is_converted_first():
    gray = noise_image(900, 500).convert("L")
    palette = noise_image(900, 500).convert("P")
    for image in (gray, palette):
        assert torch.equal(preprocess(image, InternVLImageConfig()), reference_pixel_values(image))


def test_config_validation():
    with pytest.raises(ValueError):
        InternVLImageConfig(min_num=3, max_num=2)
    with pytest.raises(ValueError):
        InternVLImageConfig(image_size=0)


def test_resolve_max_tiles_precedence(monkeypatch):
    assert resolve_max_tiles(6, 8, 12) == 6
    assert resolve_max_tiles(0, 8, 12) == 8
    assert resolve_max_tiles(-1, 8, 12) == 8
    assert resolve_max_tiles(None, None, 12) == 12
    assert resolve_max_tiles(-1, None, 6) == 6
    assert resolve_max_tiles(None, None, None) == 12
    monkeypatch.setenv("MAX_PATCH_NUM", "5")
    assert resolve_max_tiles(None, env.max_patch_num(), 12) == 5
    monkeypatch.delenv("MAX_PATCH_NUM")
    assert resolve_max_tiles(None, env.max_patch_num(), 12) == 12


def test_the_thumbnail_is_made_inline_when_its_threads_are_busy(monkeypatch) -> None:
    from concurrent.futures import ThreadPoolExecutor
    from threading import Event

    from ocula.multimodal import image_processing

    image = noise_image(1000, 750)
    expected = reference_pixel_values(image, max_num=12, thumb=True)
    busy = ThreadPoolExecutor(max_workers=1)
    release = Event()
    busy.submit(release.wait)  # the only thread is taken: the thumbnail's job waits in line
    monkeypatch.setattr(image_processing, "_THUMBNAILS", busy)
    try:
        assert torch.equal(preprocess(image, InternVLImageConfig(max_num=12)), expected)
    finally:
        release.set()
        busy.shutdown()
