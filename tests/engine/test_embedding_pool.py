"""The device store of image embeddings: rows go in and come out by page, and its size."""

from __future__ import annotations

import pytest
import torch

from ocula.engine.embedding_pool import EmbeddingPool, embedding_pool_pages, pages_for_rows


def test_rows_come_back_from_scattered_pages_and_a_partly_used_last_page() -> None:
    pool = EmbeddingPool(8, 4, 3, torch.float32, torch.device("cpu"))
    pool.pages.fill_(float("nan"))
    first = torch.arange(30, dtype=torch.float32).reshape(10, 3)  # 10 rows: 3 pages, last part
    second = -torch.arange(12, dtype=torch.float32).reshape(4, 3)
    first_pages = torch.tensor([5, 0, 6])
    second_pages = torch.tensor([2])
    pool.write(first_pages, first)
    pool.write(second_pages, second)
    for pages, embedding in ((first_pages, first), (second_pages, second)):
        rows = pool.row_indices(pages, 0, embedding.shape[0])
        assert torch.equal(pool.gather(rows), embedding)
    # A slice across a page boundary, as a prefill chunk ending inside an image reads it.
    assert torch.equal(pool.gather(pool.row_indices(first_pages, 3, 9)), first[3:9])
    assert torch.isnan(pool.pages[[1, 3, 4, 7]]).all()  # pages not handed out are untouched


def test_one_write_of_several_embeddings_equals_writing_them_one_by_one() -> None:
    embeddings = [torch.randn(rows, 3) for rows in (10, 4, 1)]
    pages = [torch.tensor([5, 0, 6]), torch.tensor([2]), torch.tensor([7])]
    one_by_one = EmbeddingPool(8, 4, 3, torch.float32, torch.device("cpu"))
    together = EmbeddingPool(8, 4, 3, torch.float32, torch.device("cpu"))
    for pool in (one_by_one, together):
        pool.pages.fill_(float("nan"))
    for page_ids, embedding in zip(pages, embeddings, strict=True):
        one_by_one.write(page_ids, embedding)
    together.write_all(list(zip(pages, embeddings, strict=True)))
    assert torch.equal(together.pages.nan_to_num(-1), one_by_one.pages.nan_to_num(-1))
    for page_ids, embedding in zip(pages, embeddings, strict=True):
        rows = together.row_indices(page_ids, 0, embedding.shape[0])
        assert torch.equal(together.gather(rows), embedding)
    together.write_all([])  # a step without images to store


def test_write_refuses_an_embedding_of_another_size_than_its_pages() -> None:
    pool = EmbeddingPool(4, 4, 2, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="pages"):
        pool.write(torch.tensor([0]), torch.zeros(5, 2))
    with pytest.raises(ValueError, match="pages"):
        EmbeddingPool(0, 4, 2, torch.float32, torch.device("cpu"))


def test_pool_holds_capacity_images_within_its_bytes_and_always_one_request() -> None:
    assert pages_for_rows(513, 256) == 3 and pages_for_rows(512, 256) == 2
    tile = 256 * 3584 * 2  # one InternVL3-8B tile's embedding in bf16: 1.75 MiB
    gib = 1 << 30
    # 200 images of up to 13 tiles (12 and a thumbnail): 4.4 GiB, within 8 GiB.
    assert embedding_pool_pages(200, 13, 8 * gib, tile, 16384, 256) == 2600
    # Within 4 GiB: 2340 tiles.
    assert embedding_pool_pages(200, 13, 4 * gib, tile, 16384, 256) == 2340
    # A context of 32k tokens could be all image tokens: 128 tiles, more than 2 x 13 or 64 MiB.
    assert embedding_pool_pages(2, 13, 4 * gib, tile, 32768, 256) == 128
    assert embedding_pool_pages(200, 13, 64 << 20, tile, 32768, 256) == 128
