"""Where image embeddings live on the device: one tensor allocated at start-up, in pages.

A page holds `page_rows` embedding rows (one InternVL tile's placeholder tokens), so an image of
T tiles takes T pages, anywhere in the pool. The scheduler's `EmbeddingCacheIndex` hands out the
page ids and the plan carries them; this class only moves rows in and out. Being allocated
before the KV pool is sized, the pool is part of `--mem_fraction` like the weights: caching
images never allocates device memory while serving (a new allocator segment waits for the
queued work, and an unbudgeted cache could run the GPU out of memory).

Sizing (`embedding_pool_pages`): `--cache_capacity` images of the model's largest default tiling
(the config's tile cap, or MAX_PATCH_NUM, plus the thumbnail) or `--image_cache_gb`, whichever is
less, and never less than the images of one request of `--max_req_total_len` tokens, so every
request that fits the context fits here. Under tensor parallelism every rank holds the whole
pool (each rank splices whole embedding rows).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ocula.config import EngineArgs
from ocula.distributed.parallel_group import SINGLE_RANK, ParallelGroup
from ocula.utils.device import cat_to_device_async

logger = logging.getLogger(__name__)


def pages_for_rows(num_rows: int, page_rows: int) -> int:
    return -(-num_rows // page_rows)


def embedding_pool_pages(
    cache_capacity: int,
    tiles_per_image: int,
    max_bytes: int,
    page_bytes: int,
    max_req_total_len: int,
    page_rows: int,
) -> int:
    """Pages the pool is allocated with (see the module doc)."""
    wanted = min(cache_capacity * tiles_per_image, max_bytes // page_bytes)
    return max(wanted, pages_for_rows(max_req_total_len, page_rows))


class EmbeddingPool:
    def __init__(
        self,
        num_pages: int,
        page_rows: int,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if num_pages < 1 or page_rows < 1:
            raise ValueError(f"an embedding pool needs pages and rows, got {num_pages}x{page_rows}")
        self.num_pages = num_pages
        self.page_rows = page_rows
        self.device = device
        self.pages = torch.empty((num_pages, page_rows, hidden_size), dtype=dtype, device=device)
        self._rows = self.pages.view(num_pages * page_rows, hidden_size)

    @property
    def nbytes(self) -> int:
        return self.pages.nbytes

    def row_indices(self, page_ids: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Pool rows (CPU int64) holding rows [start, end) of an embedding stored in `page_ids`
        (CPU int64, in the embedding's order)."""
        rows = torch.arange(start, end, dtype=torch.int64)
        return page_ids[rows // self.page_rows] * self.page_rows + rows % self.page_rows

    def write(self, page_ids: torch.Tensor, embedding: torch.Tensor) -> None:
        """Stores `embedding` [rows, hidden] (on the device) into `page_ids`, which must have room
        for its rows; queued on the current stream, so a later step's reads see it."""
        self.write_all([(page_ids, embedding)])

    def write_all(self, items: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """`write` for each (page_ids, embedding), with one host-to-device transfer of the
        destination rows for all of them (one pinned staging buffer, not one per image)."""
        indices = []
        for page_ids, embedding in items:
            if pages_for_rows(embedding.shape[0], self.page_rows) != page_ids.numel():
                raise ValueError(
                    f"{embedding.shape[0]} embedding rows do not take {page_ids.numel()} pages "
                    f"of {self.page_rows} rows"
                )
            indices.append(self.row_indices(page_ids, 0, embedding.shape[0]))
        if not indices:
            return
        rows = cat_to_device_async(indices, self.device)
        start = 0
        for _, embedding in items:
            count = embedding.shape[0]
            self._rows.index_copy_(0, rows[start : start + count], embedding.to(self._rows.dtype))
            start += count

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """The pool rows `rows` (device int64, from `row_indices`) as a new [len, hidden] tensor."""
        return self._rows.index_select(0, rows)


def build_embedding_pool(
    model: nn.Module,
    args: EngineArgs,
    dtype: torch.dtype,
    device: torch.device,
    tp: ParallelGroup = SINGLE_RANK,
) -> EmbeddingPool:
    """The pool of a vision model (`encode_images`, `tokens_per_tile`, an InternVL config).
    Collective over `tp`: every rank gets the smallest size any rank computed (MAX_PATCH_NUM
    may differ between nodes), since rank 0's cache index hands out the pages of all of them."""
    from ocula.multimodal.internvl_prompt import default_tiles_per_image

    tiles = default_tiles_per_image(model.config)
    page_rows = model.tokens_per_tile
    hidden_size = model.config.text_config.hidden_size
    num_pages = embedding_pool_pages(
        args.cache_capacity,
        tiles,
        int(args.image_cache_gb * (1 << 30)),
        page_rows * hidden_size * dtype.itemsize,
        args.max_req_total_len,
        page_rows,
    )
    num_pages = tp.min_over_ranks(num_pages)
    pool = EmbeddingPool(num_pages, page_rows, hidden_size, dtype, device)
    logger.info(
        "image embedding cache: %d tiles, %.2f GiB (--cache_capacity %d images of up to %d "
        "tiles, --image_cache_gb %g)",
        num_pages,
        pool.nbytes / (1 << 30),
        args.cache_capacity,
        tiles,
        args.image_cache_gb,
    )
    return pool
