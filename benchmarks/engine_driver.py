"""Driving Ocula's engine from a benchmark, through its public pieces only.

- Step-level timing (decode, prefill): requests go straight into the `EngineCore` (token ids and
  image spans from `LLMEngine.tokenize`), and `core.step()` is timed: that is one iteration of
  the engine process's loop (schedule, ViT for new images, forward, sample), without the
  front's detokenization.
- Whole workloads: `LLMEngine.add_request` / `step()` as `LLM.generate` does, but with a
  deadline, so a slow engine yields a partial result instead of overrunning the budget.

All requests are greedy with `ignore_eos`, so every request produces exactly `max_new_tokens`.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks.common import Deadline, sync
from ocula.engine.request import Request
from ocula.sampling.params import SamplingParams

_ids = itertools.count()


def greedy(engine: Any, max_new_tokens: int) -> SamplingParams:
    params = SamplingParams(temperature=0, max_new_tokens=max_new_tokens, ignore_eos=True)
    return engine.resolve_params(params)


@dataclass
class CoreBatch:
    request_ids: list[str]
    prompt_lens: list[int]
    sampled: dict[str, int] = field(default_factory=dict)  # tokens sampled so far, per request

    def record(self, updates: list[Any]) -> int:
        """Counts a step's token updates; returns how many belong to this batch."""
        mine = 0
        for update in updates:
            if update.request_id in self.sampled:
                self.sampled[update.request_id] += 1
                mine += 1
        return mine

    def context_lens(self) -> list[int]:
        """Tokens whose K/V the next decode step reads per request (its own new one included)."""
        return [
            n + self.sampled[r] for r, n in zip(self.request_ids, self.prompt_lens, strict=True)
        ]


def add_to_core(engine: Any, prompts: list[Any], max_new_tokens: int) -> CoreBatch:
    params = greedy(engine, max_new_tokens)
    batch = CoreBatch([], [])
    for prompt in prompts:
        request_id = f"bench-{next(_ids)}"
        token_ids, images = engine.tokenize(prompt)
        request = Request(request_id, token_ids, params, engine.eos_token_ids, images=images)
        engine.core.add_request(request)
        batch.request_ids.append(request_id)
        batch.prompt_lens.append(len(token_ids))
        batch.sampled[request_id] = 0
    return batch


def step_until_all_sampled(core: Any, batch: CoreBatch, deadline: Deadline) -> int:
    """Steps until every request of `batch` has its first token (its prefill is done)."""
    steps = 0
    while min(batch.sampled.values()) == 0:
        if deadline.remaining() <= 0:
            raise TimeoutError(f"prefill of {len(batch.request_ids)} requests ran out of time")
        batch.record(core.step())
        steps += 1
    return steps


def timed_steps(core: Any, batch: CoreBatch, device: torch.device, steps: int) -> dict[str, Any]:
    """Wall time of `steps` consecutive `core.step()` calls, synchronized at both ends."""
    contexts = batch.context_lens()
    sync(device)
    start = time.perf_counter()
    per_step = [batch.record(core.step()) for _ in range(steps)]
    sync(device)
    elapsed = time.perf_counter() - start
    return {
        "seconds": elapsed,
        "steps": steps,
        "ms_per_step": elapsed / steps * 1e3,
        "tokens_per_step": per_step,
        "context_lens_first_step": contexts,
    }


def finish(core: Any, batch: CoreBatch) -> None:
    """Aborts the batch's requests and steps until the engine holds nothing of them."""
    for request_id in batch.request_ids:
        core.abort_request(request_id)
    while core.has_work():
        core.step()


@dataclass
class OfflineRun:
    seconds: float
    finished: bool  # every request completed before the deadline
    requests: int
    completed: int
    output_tokens: int
    prompt_tokens: list[int]

    def summary(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds,
            "finished": self.finished,
            "requests": self.requests,
            "completed_requests": self.completed,
            "output_tokens": self.output_tokens,
            "mean_prompt_tokens": sum(self.prompt_tokens) / max(1, len(self.prompt_tokens)),
            "output_tokens_per_s": self.output_tokens / self.seconds,
            "requests_per_s": self.completed / self.seconds,
        }


def run_offline(
    engine: Any, prompts: list[Any], max_new_tokens: int, deadline: Deadline
) -> OfflineRun:
    """All prompts through the in-process engine, timed from `add_requests` (which
    tokenizes and decodes images) to the last finished output; stops at the deadline."""
    params = greedy(engine, max_new_tokens)
    ids = [f"offline-{next(_ids)}" for _ in prompts]
    tokens = 0
    prompt_lens: list[int] = []
    start = time.perf_counter()
    engine.add_requests(
        [(request_id, prompt, params) for request_id, prompt in zip(ids, prompts, strict=True)]
    )
    completed = 0
    while engine.has_unfinished_requests() and deadline.remaining() > 0:
        for output in engine.step():
            completed += 1
            tokens += len(output.token_ids)
            prompt_lens.append(output.prompt_tokens)
    elapsed = time.perf_counter() - start
    finished = not engine.has_unfinished_requests()
    for request_id in ids:
        engine.abort_request(request_id)
    while engine.core.has_work():
        engine.core.step()
    return OfflineRun(elapsed, finished, len(prompts), completed, tokens, prompt_lens)
