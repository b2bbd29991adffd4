"""Random schedules against the image-embedding contract between the scheduler and the runner.

A stand-in runner applies each plan as the real one does (drop the plan's frees, add its
encodes, then read the embedding slices of its chunks) in the engine core's overlap order
(schedule and launch step n + 1, then apply step n). Under random arrivals sharing a few images,
chunk sizes, a small KV pool (preemptions), aborts, EOS and the prefix cache, it checks every
step that no chunk reads an embedding the runner no longer has, that no two embeddings the
runner holds share a page of the embedding pool (a pool barely larger than one request makes
requests wait for pages), that the cache's use counts are exactly the running and waiting
requests' holds, and that requests whose images are all planned hold nothing after the next plan
starts; then that every request finishes once arrivals stop.
"""

from __future__ import annotations

import random

import pytest
import torch

from ocula.engine.image_inputs import ImageScheduler
from ocula.engine.prefix_cache import RadixCache
from ocula.engine.request import ImageSpan, Request
from ocula.engine.scheduler import Scheduler
from ocula.engine.slot_allocator import SlotAllocator
from ocula.engine.step_plan import SampledToken, StepPlan
from ocula.sampling.params import SamplingParams

EOS = 2


def tile(span: ImageSpan) -> torch.Tensor:
    return torch.zeros((1, 3, 2, 2), dtype=torch.uint8)


MAX_IMAGE_TOKENS = 12
MAX_IMAGES = 2
BUDGET = 16  # tokens per step


def random_request(rng: random.Random, name: str, keys: dict[str, int]) -> Request:
    """Up to MAX_IMAGES images from `keys` (key -> placeholder tokens, fixed per image)."""
    spans, offset = [], rng.randint(0, 3)
    for _ in range(rng.choice([1, 1, MAX_IMAGES])):
        key = rng.choice(list(keys))
        length = keys[key]
        spans.append(ImageSpan(key, offset, length, image_bytes=b"x"))
        offset += length + rng.randint(0, 3)
    prompt = [10] * (offset + rng.randint(0, 2))  # equal tokens: prefix-cache hits happen
    params = SamplingParams(temperature=0, max_new_tokens=rng.randint(1, 6))
    return Request(name, prompt, params, frozenset({EOS}), spans)


def fits_engine(request: Request, kv_capacity: int, chunk: int | None) -> bool:
    """What the engine core admits to the scheduler (it rejects the rest on arrival)."""
    total = request.num_prompt_tokens + request.sampling_params.max_new_tokens
    return total <= kv_capacity and (chunk is not None or request.num_prompt_tokens <= BUDGET)


class StandInRunner:
    def __init__(self, keys: dict[str, int], num_pages: int, page_rows: int) -> None:
        self.keys = keys
        self.num_pages = num_pages
        self.page_rows = page_rows
        self.pages: dict[str, list[int]] = {}  # the embeddings held, by key
        self.slices_read = 0

    def launch(self, plan: StepPlan) -> None:
        for key in plan.encoder_frees:
            del self.pages[key]
        for item in plan.encoder_inputs:
            assert item.key not in self.pages
            assert len(item.pages) == -(-self.keys[item.key] // self.page_rows)
            taken = {page for pages in self.pages.values() for page in pages}
            assert not taken & set(item.pages) and len(set(item.pages)) == len(item.pages)
            assert all(0 <= page < self.num_pages for page in item.pages)
            self.pages[item.key] = item.pages
        for seq in plan.sequences:
            for piece in seq.image_slices:
                assert piece.key in self.pages, f"{seq.request_id} reads dropped {piece.key}"
                assert piece.src_end <= len(self.pages[piece.key]) * self.page_rows
                self.slices_read += 1


@pytest.mark.parametrize("seed", range(16))
def test_no_chunk_reads_a_dropped_embedding_and_holds_end_with_the_images(seed: int) -> None:
    rng = random.Random(seed)
    page_rows = rng.choice([1, 4, 8])
    request_pages = MAX_IMAGES * -(-MAX_IMAGE_TOKENS // page_rows)
    num_pages = rng.choice([1, 1, 2, 8]) * request_pages
    images = ImageScheduler(rng.choice([1, 2, 3]), tile, num_pages, page_rows)
    allocator = SlotAllocator(rng.choice([40, 64, 96]))
    prefix_cache = RadixCache(allocator, enabled=rng.random() < 0.5)
    chunk = rng.choice([3, 8, None])
    scheduler = Scheduler(allocator, prefix_cache, BUDGET, chunk, 6, 100, images=images)
    keys = {f"k{i}": rng.randint(1, MAX_IMAGE_TOKENS) for i in range(rng.choice([2, 3, 5, 8]))}
    runner = StandInRunner(keys, num_pages, page_rows)

    def apply(plan: StepPlan) -> None:
        sampled = [
            SampledToken(s.request_id, EOS if rng.random() < 0.05 else 7)
            for s in plan.sequences
            if s.samples
        ]
        scheduler.update(plan, sampled)

    in_flight, count = None, 0
    for step in range(650):
        arrivals = step < 250  # then every request must finish
        if arrivals and rng.random() < 0.3 and len(scheduler.requests) < 8:
            request = random_request(rng, f"r{count}", keys)
            count += 1
            if not fits_engine(request, allocator.capacity, chunk):
                continue
            scheduler.add_request(request)
            images.prefetch(request)
        if arrivals and rng.random() < 0.05 and scheduler.requests:
            scheduler.abort_request(rng.choice(list(scheduler.requests)))
        plan = scheduler.schedule()
        runner.launch(plan)
        planned_now = {seq.request_id: seq.num_new_tokens for seq in plan.sequences}
        for request in scheduler.running:
            if request.images:
                images_end = max(span.offset + span.length for span in request.images)
                before = request.num_scheduled_tokens - planned_now.get(request.request_id, 0)
                assert before < images_end or not request.held_image_keys
        previous, in_flight = in_flight, plan
        if previous is not None:
            apply(previous)
        if plan.is_empty:
            apply(plan)
            in_flight = None
            if scheduler.waiting_for_tiles:  # as the engine core does
                images.wait_for_tiles()
        holds: dict[str, int] = {}
        for request in [*scheduler.running, *scheduler.waiting]:
            for key in request.held_image_keys:
                holds[key] = holds.get(key, 0) + 1
        entries = images.index._entries
        assert set(holds) <= set(entries)
        assert all(entry.users == holds.get(key, 0) for key, entry in entries.items())
        assert set(entries) <= set(runner.pages)  # evictions reach the runner with the next plan
        assert all(runner.pages[key] == entry.pages for key, entry in entries.items())
    assert runner.slices_read > 0
    assert not scheduler.requests and in_flight is None
