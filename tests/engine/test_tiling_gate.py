"""The idle plan's tiling gate (`TilingGate`): which image requests it looks up in the prefix
cache to see whether they still wait for tiles, and which it holds back while an image is tiled."""

from __future__ import annotations

import threading

import torch

from ocula.engine.image_inputs import ImageScheduler
from ocula.engine.request import Request
from ocula.engine.tiling_admission import TilingGate
from tests.engine.test_image_prefetch import PAGE_ROWS, PAGES, admitted, recording_tiler, request


class CountingKV:
    """The two RequestKV calls the tiling gate makes, recording which requests it looked up."""

    def __init__(self) -> None:
        self.looked_up: list[str] = []

    def match_prefix(self, req: Request) -> int:
        self.looked_up.append(req.request_id)
        return 0

    def unlock_prefix(self, req: Request) -> None:
        pass


def test_the_idle_gate_looks_up_no_prefix_for_a_request_whose_images_are_cached() -> None:
    """Its images' embeddings cached, a request has nothing to tile whatever its prefix-cache hit:
    the gate skips that lookup (the admission makes the one it needs), and still finds an image
    being tiled behind it, which makes the idle plan hold back the requests that encode."""
    gate = threading.Event()
    images = ImageScheduler(8, recording_tiler(gate)[0], PAGES, PAGE_ROWS)
    gate.set()
    assert admitted(images, request("first", "x")) == [("x", 1)]  # "x" is embedded from now on
    gate.clear()
    cached, untiled = request("cached", "x"), request("untiled", "yy")
    kv = CountingKV()
    alone = TilingGate.for_plan(images, kv, [cached], 8, 64, None, idle=True)
    assert kv.looked_up == [] and not alone.must_wait(cached, 0)
    both = TilingGate.for_plan(images, kv, [cached, untiled], 8, 64, None, idle=True)
    assert kv.looked_up == ["untiled"]
    assert not both.must_wait(cached, 0) and both.must_wait(untiled, 0)
    gate.set()
    images.prefetcher.tiles["yy"].result()


def test_the_idle_gate_looks_up_no_prefix_for_a_request_whose_tiles_are_made() -> None:
    """A new image whose tiles came with the request (the front's) or are tiled already waits on
    no tiling whatever the request's prefix-cache hit: no lookup for it. A request whose image is
    still being tiled is looked up, and makes the idle plan hold back the requests that encode."""
    gate = threading.Event()
    images = ImageScheduler(8, recording_tiler(gate)[0], PAGES, PAGE_ROWS)
    with_tiles = request("with_tiles", "x")
    with_tiles.images[0].image_bytes = b"the payload"
    with_tiles.images[0].pixel_values = torch.full((1, 3, 2, 2), 7, dtype=torch.uint8)
    untiled = request("untiled", "yy")
    for r in (with_tiles, untiled):
        images.prefetch(r)
    kv = CountingKV()
    alone = TilingGate.for_plan(images, kv, [with_tiles], 8, 64, None, idle=True)
    assert kv.looked_up == [] and not alone.must_wait(with_tiles, 0)
    both = TilingGate.for_plan(images, kv, [with_tiles, untiled], 8, 64, None, idle=True)
    assert kv.looked_up == ["untiled"]
    assert both.must_wait(with_tiles, 0) and both.must_wait(untiled, 0)
    gate.set()
    images.prefetcher.tiles["yy"].result()  # tiled now: no lookup for it either
    done = TilingGate.for_plan(images, kv, [with_tiles, untiled], 8, 64, None, idle=True)
    assert kv.looked_up == ["untiled"]
    assert not done.must_wait(with_tiles, 0) and not done.must_wait(untiled, 0)
    assert admitted(images, with_tiles) == [("x", 7)]
