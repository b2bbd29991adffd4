"""Random schedules against the image-embedding contract between the scheduler and the runner.

A stand-in runner applies each plan as the real one does (drop the plan's frees, add its
encodes, then read the embedding slices of its chunks) in the engine core's overlap order
(schedule and launch step n + 1, then apply step n). Under random arrivals sharing a few images,
chunk sizes, a small KV pool (preemptions), aborts, EOS and the prefix cache, it checks every
step that no chunk reads an embedding the runner no longer has, that the cache's use counts are
exactly the running and waiting requests' holds, and that requests whose images are all planned
hold nothing after the next plan starts.
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


def random_request(rng: random.Random, name: str, keys: list[str]) -> Request:
    spans, offset = [], rng.randint(0, 3)
    for _ in range(rng.choice([1, 1, 2])):
        length = rng.randint(1, 12)
        spans.append(ImageSpan(rng.choice(keys), offset, length, image_bytes=b"x"))
        offset += length + rng.randint(0, 3)
    prompt = [10] * (offset + rng.randint(0, 2))  # equal tokens: prefix-cache hits happen
    params = SamplingParams(temperature=0, max_new_tokens=rng.randint(1, 6))
    return Request(name, prompt, params, frozenset({EOS}), spans)


class StandInRunner:
    def __init__(self) -> None:
        self.embeddings: set[str] = set()
        self.slices_read = 0

    def launch(self, plan: StepPlan) -> None:
        self.embeddings -= set(plan.encoder_frees)
        self.embeddings |= {item.key for item in plan.encoder_inputs}
        for seq in plan.sequences:
            for piece in seq.image_slices:
                assert piece.key in self.embeddings, f"{seq.request_id} reads dropped {piece.key}"
                self.slices_read += 1


@pytest.mark.parametrize("seed", range(12))
def test_no_chunk_reads_a_dropped_embedding_and_holds_end_with_the_images(seed: int) -> None:
    rng = random.Random(seed)
    images = ImageScheduler(rng.choice([1, 2, 3]), tile)
    allocator = SlotAllocator(rng.choice([40, 64, 96]))
    prefix_cache = RadixCache(allocator, enabled=rng.random() < 0.5)
    chunk = rng.choice([3, 8, None])
    scheduler = Scheduler(allocator, prefix_cache, 16, chunk, 6, 100, images=images)
    keys = [f"k{i}" for i in range(rng.choice([2, 3, 5]))]
    runner = StandInRunner()

    def apply(plan: StepPlan) -> None:
        sampled = [
            SampledToken(s.request_id, EOS if rng.random() < 0.05 else 7)
            for s in plan.sequences
            if s.samples
        ]
        scheduler.update(plan, sampled)

    in_flight, count = None, 0
    for _ in range(250):
        if rng.random() < 0.3 and len(scheduler.requests) < 8:
            request = random_request(rng, f"r{count}", keys)
            count += 1
            scheduler.add_request(request)
            images.prefetch(request)
        if rng.random() < 0.05 and scheduler.requests:
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
        holds: dict[str, int] = {}
        for request in [*scheduler.running, *scheduler.waiting]:
            for key in request.held_image_keys:
                holds[key] = holds.get(key, 0) + 1
        assert set(holds) <= set(images.index._users)
        assert all(users == holds.get(key, 0) for key, users in images.index._users.items())
    assert runner.slices_read > 0
