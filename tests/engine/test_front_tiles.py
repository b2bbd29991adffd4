"""Tiles the server's front made (`ImageSpan.pixel_values` beside the image's payload): the
engine takes them as a finished tiling, within the prefetch window, and tiles the bytes itself
where it drops them."""

from __future__ import annotations

import threading

import torch

from ocula.engine import tile_prefetch
from ocula.engine.image_inputs import ImageScheduler
from ocula.engine.request import ImageSpan, Request
from ocula.sampling.params import SamplingParams

PAGES = 4096
PAGE_ROWS = 256
ENGINE_TILE_VALUE = 200  # what this file's tiler makes: tiles the front made hold other values


def front_span(key: str, offset: int, length: int, value: int | None) -> ImageSpan:
    """A span as the front sends it: its bytes, and its tiles (all `value`) unless None."""
    tiles = None if value is None else torch.full((1, 3, 2, 2), value, dtype=torch.uint8)
    return ImageSpan(key, offset, length, image_bytes=b"image", pixel_values=tiles)


def request(name: str, *spans: ImageSpan) -> Request:
    prompt = list(range(max(span.offset + span.length for span in spans) + 1))
    return Request(name, prompt, SamplingParams(), frozenset(), list(spans))


def counting_tiler() -> tuple[ImageScheduler, list[str]]:
    calls: list[str] = []
    lock = threading.Lock()

    def tile(span: ImageSpan) -> torch.Tensor:
        with lock:
            calls.append(span.key)
        return torch.full((1, 3, 2, 2), ENGINE_TILE_VALUE, dtype=torch.uint8)

    return ImageScheduler(64, tile, PAGES, PAGE_ROWS), calls


def encoded(images: ImageScheduler, req: Request) -> list[tuple[str, int]]:
    """(key, tile value) of what a step admitting `req` encodes."""
    to_encode, _ = images.admit(req, 0)
    return [(item.key, int(item.pixel_values.max())) for item in images.finish_plan(to_encode, [])]


def test_front_tiles_are_a_finished_tiling_and_leave_the_span() -> None:
    images, calls = counting_tiler()
    first = request("a", front_span("x", 0, 4, 7), front_span("y", 4, 4, 9))
    assert images.prefetch(first)
    # Ready at once: the scheduler admits the request in the step it arrives in.
    assert images.tiles_ready(first, 0, past_window=False)
    # The window holds them now; the waiting request does not hold a second reference.
    assert all(span.pixel_values is None for span in first.images)
    assert sorted(images.prefetcher.tokens.items()) == [("x", 4), ("y", 4)]
    assert encoded(images, first) == [("x", 7), ("y", 9)]
    assert calls == [] and not images.prefetcher.tiles
    # The same image again, with the front's tiles: cached, so the tiles are dropped unused.
    again = request("b", front_span("x", 0, 4, 7))
    assert images.prefetch(again) and again.images[0].pixel_values is None
    assert images.admit(again, 0) == ([], [])


def test_two_waiting_requests_with_one_new_image_share_the_first_ones_tiles() -> None:
    images, calls = counting_tiler()
    first, second = request("a", front_span("z", 0, 4, 5)), request("b", front_span("z", 0, 4, 6))
    assert images.prefetch(first) and images.prefetch(second)
    assert second.images[0].pixel_values is None  # dropped: the first request's are kept
    images.drop_prefetched(first)  # the first leaves while waiting: its tiles stay for the other
    assert encoded(images, second) == [("z", 5)] and calls == []


def test_past_the_window_the_front_tiles_are_dropped_and_the_bytes_tiled_later() -> None:
    images, calls = counting_tiler()
    per_window = 2
    length = tile_prefetch.MAX_PREFETCHED_TOKENS // per_window
    queue = [request(f"r{i}", front_span(f"k{i}", 0, length, i + 1)) for i in range(per_window + 1)]
    last = queue[-1]
    # A request given two images, the window full at the first: neither keeps its tiles.
    crowded = request("c", front_span("p", 0, length, 50), front_span("q", length, 4, 51))
    assert [images.prefetch(r) for r in [*queue, crowded]] == [True, True, False, False]
    assert last.images[0].pixel_values is None and "k2" not in images.prefetcher.tiles
    assert all(span.pixel_values is None for span in crowded.images)
    assert not images.tiles_ready(last, 0, past_window=False)
    # Admitting the head frees room: the next image is tiled from its bytes, by the engine.
    assert encoded(images, queue[0]) == [("k0", 1)]
    images.finish_plan([], queue[1:])
    images.prefetcher.tiles["k2"].result()
    assert calls == ["k2"]
    assert encoded(images, queue[1]) == [("k1", 2)]
    assert encoded(images, last) == [("k2", ENGINE_TILE_VALUE)]


def test_tiles_given_without_a_payload_stay_with_their_span() -> None:
    images, calls = counting_tiler()
    given = ImageSpan("g", 0, 4, pixel_values=torch.full((1, 3, 2, 2), 3, dtype=torch.uint8))
    req = request("a", given)
    assert images.prefetch(req) and given.pixel_values is not None and not images.prefetcher.tiles
    assert images.tiles_ready(req, 0, past_window=False)
    assert encoded(images, req) == [("g", 3)] and calls == []
