"""Tiling images ahead of admission (`ImageScheduler`): worker threads, one tiling per image,
a bounded window topped up from the waiting queue, and parallel tiling of a step's images."""

from __future__ import annotations

import select
import threading
from collections.abc import Callable

import pytest
import torch

from ocula.engine import tile_prefetch
from ocula.engine.image_inputs import ImageScheduler
from ocula.engine.request import ImageSpan, Request
from ocula.sampling.params import SamplingParams

# An embedding pool with room for everything these tests admit (its limits are tested elsewhere).
PAGES = 4096
PAGE_ROWS = 256

TileFn = Callable[[ImageSpan], torch.Tensor]


def request(name: str, *keys: str, length: int = 4) -> Request:
    spans = [ImageSpan(key, length * i, length) for i, key in enumerate(keys)]
    return Request(name, list(range(length * len(keys) + 1)), SamplingParams(), frozenset(), spans)


def recording_tiler(gate: threading.Event) -> tuple[TileFn, list[tuple[str, str]]]:
    """A tiler that waits for `gate`, records (key, thread name), and returns uint8 tiles whose
    values tell images apart (the key's length)."""
    calls: list[tuple[str, str]] = []

    def tile(span: ImageSpan) -> torch.Tensor:
        calls.append((span.key, threading.current_thread().name))
        gate.wait(5)
        return torch.full((1, 3, 2, 2), len(span.key), dtype=torch.uint8)

    return tile, calls


def admitted(images: ImageScheduler, req: Request, waiting: list[Request] = ()) -> list:
    """What a step admitting `req` encodes, as (key, tile value), after `finish_plan`."""
    to_encode, _ = images.admit(req, 0)
    inputs = images.finish_plan(to_encode, waiting)
    assert all(isinstance(item.pixel_values, torch.Tensor) for item in inputs)
    return [(item.key, int(item.pixel_values.max())) for item in inputs]


def test_images_are_tiled_ahead_in_a_worker_thread_and_taken_once() -> None:
    gate = threading.Event()
    tile, calls = recording_tiler(gate)
    images = ImageScheduler(8, tile, PAGES, PAGE_ROWS)
    first, same_image, other = request("a", "x"), request("b", "x"), request("c", "yy", "z")
    for r in (first, same_image, other, first):  # prefetching twice changes nothing
        assert images.prefetch(r)
    gate.set()
    assert admitted(images, first) == [("x", 1)]
    assert [key for key, _ in calls].count("x") == 1  # one tiling for both requests
    # A second request with the same image finds it cached: no tiling, nothing to encode.
    assert images.admit(same_image, 0) == ([], [])
    images.drop_prefetched(other)  # left while waiting: its prefetched tiles are forgotten
    assert images.prefetcher.tiles == {} and images.prefetcher.waiters == {}
    # Two waiting requests share a new image; the first leaves: the second keeps the tiles.
    leaving, staying = request("e", "w"), request("f", "w")
    for r in (leaving, staying, leaving):
        images.prefetch(r)
    images.drop_prefetched(leaving)
    assert admitted(images, staying) == [("w", 1)] and not images.prefetcher.tiles
    # yy and z were dropped: each was tiled only if its thread started before the cancel.
    tiled = [key for key, _ in calls]
    assert sorted(tiled)[:2] == ["w", "x"] and set(tiled) <= {"w", "x", "yy", "z"}
    assert len(tiled) == len(set(tiled))
    assert all(thread.startswith("ocula-tiling") for _, thread in calls)


def test_the_window_is_bounded_and_topped_up_from_the_waiting_queue() -> None:
    gate = threading.Event()
    gate.set()
    tile, calls = recording_tiler(gate)
    images = ImageScheduler(64, tile, PAGES, PAGE_ROWS)
    per_window = 3
    length = tile_prefetch.MAX_PREFETCHED_TOKENS // per_window
    queue = [request(f"r{i}", f"k{i}", length=length) for i in range(per_window + 2)]
    for r in queue:
        images.prefetch(r)
    assert sorted(images.prefetcher.tiles) == [f"k{i}" for i in range(per_window)]
    # A step admits the head; the window it frees goes to the next waiting image, in order.
    assert admitted(images, queue[0], queue[1:]) == [("k0", 2)]
    assert sorted(images.prefetcher.tiles) == [f"k{i}" for i in range(1, per_window + 1)]
    # An image larger than the whole window still prefetches when nothing else waits.
    huge = request("huge", "big", length=2 * tile_prefetch.MAX_PREFETCHED_TOKENS)
    assert not images.prefetch(huge)
    for r in queue[1:]:
        admitted(images, r)
    assert images.prefetch(huge) and list(images.prefetcher.tiles) == ["big"]
    images.prefetcher.tiles["big"].result()
    assert sorted(key for key, _ in calls) == sorted([f"k{i}" for i in range(len(queue))] + ["big"])


def test_images_admitted_before_their_prefetch_are_tiled_in_parallel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Both tilings must be running at once for either to finish: one by one, this would hang.
    monkeypatch.setattr(tile_prefetch, "PREFETCH_THREADS", 2)
    both_running = threading.Barrier(2, timeout=5)
    names: list[str] = []

    def tile(span: ImageSpan) -> torch.Tensor:
        both_running.wait()
        names.append(threading.current_thread().name)
        return torch.zeros((1, 3, 2, 2), dtype=torch.uint8)

    images = ImageScheduler(8, tile, PAGES, PAGE_ROWS)
    first, second = request("a", "p"), request("b", "q")  # never prefetched
    to_encode, _ = images.admit(first, 0)
    more, _ = images.admit(second, 0)
    inputs = images.finish_plan(to_encode + more, [])
    assert [item.key for item in inputs] == ["p", "q"]
    assert len(names) == 2 and all(name.startswith("ocula-tiling") for name in names)


def test_a_failed_tiling_surfaces_at_finish_plan() -> None:
    def tile(span: ImageSpan) -> torch.Tensor:
        raise OSError("truncated file")

    images = ImageScheduler(8, tile, PAGES, PAGE_ROWS)
    to_encode, _ = images.admit(request("a", "bad"), 0)
    with pytest.raises(OSError, match="truncated"):
        images.finish_plan(to_encode, [])


def test_an_image_whose_kv_is_cached_is_tiled_once_for_all_its_waiting_requests() -> None:
    gate = threading.Event()
    gate.set()
    tile, calls = recording_tiler(gate)
    images = ImageScheduler(8, tile, PAGES, PAGE_ROWS)
    waiting = [request(f"r{i}", "k", length=4) for i in range(4)]
    for r in waiting:
        images.prefetch(r)
    # Each request's image is inside its prefix-cache hit: no embedding, and the tiles stay
    # prefetched for the requests still waiting, until the last one is admitted.
    for index, r in enumerate(waiting):
        to_encode, _ = images.admit(r, cached_prefix_len=8)
        assert images.finish_plan(to_encode, waiting[index + 1 :]) == []
        assert ("k" in images.prefetcher.tiles) == (index < len(waiting) - 1)
    assert [key for key, _ in calls] == ["k"] and images.prefetcher.waiters == {}
    assert images.num_served_by_prefix_cache == 4


def test_a_request_ending_while_preempted_takes_its_prefetched_tiles_along() -> None:
    from ocula.engine.prefix_cache import RadixCache
    from ocula.engine.scheduler import Scheduler
    from ocula.engine.slot_allocator import SlotAllocator
    from ocula.engine.step_plan import SampledToken

    gate = threading.Event()
    gate.set()
    tile, _ = recording_tiler(gate)
    images = ImageScheduler(1, tile, PAGES, PAGE_ROWS)
    allocator = SlotAllocator(64)
    scheduler = Scheduler(allocator, RadixCache(allocator), 64, None, 4, 100, images=images)

    def with_image(name: str, key: str, max_new_tokens: int) -> Request:
        params = SamplingParams(temperature=0, max_new_tokens=max_new_tokens, ignore_eos=True)
        span = ImageSpan(key, 0, 4, image_bytes=b"x")
        return Request(name, [100, 101, 102, 103, 7], params, frozenset(), [span])

    ending, other = with_image("a", "ka", 1), with_image("b", "kb", 5)
    for r in (ending, other):
        scheduler.add_request(r)
        images.prefetch(r)
    for key in ("ka", "kb"):  # an idle engine admits them once tiled
        images.prefetcher.tiles[key].result()
    in_flight = scheduler.schedule()
    # The next plan preempts `ending` while `in_flight` samples its last token: it waits at the
    # head of the queue with that token pending, and must not be prefetched again...
    scheduler._preempt(ending)
    scheduler.schedule()
    assert "ka" not in images.prefetcher.tiles
    images.prefetch(ending)  # ...and when it was (as on arrival), ending must drop it.
    assert images.prefetcher.waiters == {"ka": {"a"}}
    sampled = [SampledToken(s.request_id, 5) for s in in_flight.sequences if s.samples]
    updates = scheduler.update(in_flight, sampled)
    assert [u.request_id for u in updates if u.finish_reason is not None] == ["a"]
    assert (
        images.prefetcher.waiters == {}
        and images.prefetcher.tiles == {}
        and images.prefetcher.tokens == {}
    )


def test_a_request_waits_for_its_tiles_and_later_ones_pass_it() -> None:
    """A step never waits for tiles: the image request is admitted once its tiles are made (past
    the window: it is the first waiting for them), and a text request behind it is admitted
    meanwhile, whether other requests run or not."""
    from ocula.engine.prefix_cache import RadixCache
    from ocula.engine.scheduler import Scheduler
    from ocula.engine.slot_allocator import SlotAllocator

    gate = threading.Event()
    tile, calls = recording_tiler(gate)
    images = ImageScheduler(8, tile, PAGES, PAGE_ROWS)
    allocator = SlotAllocator(4 * tile_prefetch.MAX_PREFETCHED_TOKENS)
    budget = 3 * tile_prefetch.MAX_PREFETCHED_TOKENS
    scheduler = Scheduler(allocator, RadixCache(allocator), budget, None, 8, budget, images=images)
    params = SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True)

    def text(name: str) -> Request:
        return Request(name, [1, 2, 3], params, frozenset())

    big = 2 * tile_prefetch.MAX_PREFETCHED_TOKENS  # more than the whole prefetch window
    with_image = Request(
        "image",
        list(range(big + 1)),
        params,
        frozenset(),
        [ImageSpan("img", 0, big, image_bytes=b"x")],
    )
    scheduler.add_request(text("running"))
    assert [s.request_id for s in scheduler.schedule().sequences] == ["running"]
    scheduler.add_request(with_image)
    scheduler.add_request(text("behind"))
    plan = scheduler.schedule()
    assert sorted(s.request_id for s in plan.sequences) == ["behind", "running"]
    assert [r.request_id for r in scheduler.waiting] == ["image"]
    assert "img" in images.prefetcher.tiles and calls and not plan.encoder_inputs
    assert not scheduler.waiting_for_tiles  # others run: their steps go on meanwhile
    gate.set()
    images.prefetcher.tiles["img"].result()
    plan = scheduler.schedule()
    assert "image" in [s.request_id for s in plan.sequences]
    assert [item.key for item in plan.encoder_inputs] == ["img"] and not scheduler.waiting


def test_an_idle_engine_admits_text_while_an_image_is_tiled_and_waits_for_the_tiling() -> None:
    from ocula.engine.prefix_cache import RadixCache
    from ocula.engine.scheduler import Scheduler
    from ocula.engine.slot_allocator import SlotAllocator

    gate = threading.Event()
    images = ImageScheduler(8, recording_tiler(gate)[0], PAGES, PAGE_ROWS)
    wake_fd = images.tiling.fileno()
    allocator = SlotAllocator(64)
    scheduler = Scheduler(allocator, RadixCache(allocator), 64, None, 8, 64, images=images)
    params = SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True)
    alone = Request("alone", [5, 6, 7, 8, 9], params, frozenset(), [ImageSpan("a", 0, 4)])
    scheduler.add_request(alone)
    plan = scheduler.schedule()
    assert plan.is_empty and scheduler.waiting_for_tiles
    # The engine would now wait for the tiling or a new request; a text request comes first.
    scheduler.add_request(Request("text", [1, 2, 3], params, frozenset()))
    plan = scheduler.schedule()
    assert [s.request_id for s in plan.sequences] == ["text"] and not scheduler.waiting_for_tiles
    assert not select.select([wake_fd], [], [], 0)[0]  # no tiling has finished
    gate.set()
    images.wait_for_tiles()
    assert select.select([wake_fd], [], [], 5)[0]  # the finished tiling wakes a polling loop
    plan = scheduler.schedule()
    assert [s.request_id for s in plan.sequences] == ["text", "alone"]
    assert [item.key for item in plan.encoder_inputs] == ["a"]
    images.tiling.close()
