"""The engine core: a scheduler and a model runner stepping in a loop, in token ids only.

Text, tokenizers and stop strings are the front's business (`LLMEngine` in-process, the HTTP
server's front process later); the core sees `Request`s in and `TokenUpdate`s out.

With tensor parallelism the core lives on rank 0: every step it broadcasts its `StepPlan` to the
group, and the other ranks (`ocula.engine.tp_worker`) run the same plan on their runners.

Overlap (unless --disable_overlap_schedule): `step()` schedules and launches step n+1 before it
waits for step n's tokens, so the host's work (scheduling, building the batch, detokenizing and
sending the previous outputs) runs while the device computes. A step's token updates are
therefore returned by the next call of `step()`; a request that stops on a sampled token has
had one more token computed, which is dropped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from ocula.config import EngineArgs
from ocula.distributed.parallel_group import SINGLE_RANK, ParallelGroup
from ocula.engine.image_inputs import ImageScheduler
from ocula.engine.model_runner import ModelRunner
from ocula.engine.model_setup import ModelSetup
from ocula.engine.outputs import TokenUpdate
from ocula.engine.prefix_cache import RadixCache
from ocula.engine.request import Request
from ocula.engine.runner_sampling import PendingSamples
from ocula.engine.scheduler import Scheduler
from ocula.engine.slot_allocator import SlotAllocator
from ocula.engine.step_plan import StepPlan

logger = logging.getLogger(__name__)

# A step longer than this is logged: a first use (a Triton kernel compiled for a new
# specialization, a vision graph captured for a new tile count) or a stall worth finding.
SLOW_STEP_SECONDS = 0.5


class RequestRejectedError(ValueError):
    """A request the engine can never serve as asked (the message says why)."""


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_capacity: int
    kv_free: int
    prefix_cache_tokens: int
    prefix_cache_evictable: int
    prefix_cache_hit_rate: float
    num_preemptions: int
    image_cache_hits: int = 0
    image_cache_misses: int = 0
    image_cache_entries: int = 0
    image_cache_tiles: int = 0  # pages of the device pool of embeddings, one tile each
    image_cache_tiles_free: int = 0  # pages no cached image holds
    images_in_prefix_cache: int = 0  # images whose KV the prefix cache already held
    promised_tokens: int = 0  # prompt + max_new_tokens of every unfinished request


def request_size_problem(
    prompt_len: int, max_new_tokens: int, max_total_len: int, kv_capacity: int
) -> str | None:
    """Why a request of this size can never run, or None. The front checks it before sending a
    request (a 400 at once); the core checks it again on arrival."""
    if prompt_len == 0:
        return "the prompt is empty: at least one token is needed"
    total = prompt_len + max_new_tokens
    if total > max_total_len:
        return (
            f"the prompt has {prompt_len} tokens and max_new_tokens is {max_new_tokens}: together "
            f"{total}, over the limit of {max_total_len} tokens (--max_req_total_len or the "
            "model's context length)"
        )
    if total > kv_capacity:
        return (
            f"the request needs up to {total} KV cache tokens but the cache holds {kv_capacity} "
            "(--max_total_token_num / --mem_fraction)"
        )
    return None


def build_model_runner(
    args: EngineArgs, setup: ModelSetup, tp: ParallelGroup = SINGLE_RANK
) -> ModelRunner:
    """The runner of one rank. Every rank of `tp` builds it with the same arguments (the KV pool
    size is agreed on collectively); `setup.device` is this rank's device."""
    return ModelRunner(args, setup, tp)


class EngineCore:
    def __init__(
        self, args: EngineArgs, setup: ModelSetup, tp: ParallelGroup = SINGLE_RANK
    ) -> None:
        """`tp` is rank 0's group when the model runs over several ranks (the other ranks follow
        the plans this core broadcasts)."""
        if args.tp != tp.size:
            raise ValueError(
                f"--tp {args.tp} needs one process per rank, which only the server starts: "
                f"serve the model with `ocula serve --tp {args.tp}` (the offline LLM runs one "
                "process, tp=1)"
            )
        if tp.rank != 0:
            raise ValueError(f"the engine core runs on rank 0, not rank {tp.rank}")
        self.args = args
        self.tp = tp
        self.vocab_size = setup.model_config.vocab_size
        batch_max_tokens = args.effective_batch_max_tokens
        self.runner = build_model_runner(args, setup, tp)
        model_limit = self.runner.model.max_context_len()
        self.max_req_total_len = min(args.max_req_total_len, model_limit)
        if model_limit < args.max_req_total_len:
            logger.info(
                "requests are limited to %d tokens, the model's context length "
                "(--max_req_total_len is %d)",
                model_limit,
                args.max_req_total_len,
            )
        self.allocator = SlotAllocator(self.runner.kv_pool.num_slots)
        self.prefix_cache = RadixCache(
            self.allocator, enabled=not args.disable_dynamic_prompt_cache
        )
        self.images: ImageScheduler | None = None
        if self.is_multimodal:
            from ocula.multimodal.image_loading import warm_image_decoders
            from ocula.multimodal.preprocess_span import preprocess_span

            warm_image_decoders()  # this process decodes every image it encodes
            pool = self.runner.embedding_pool
            self.images = ImageScheduler(
                args.cache_capacity, preprocess_span, pool.num_pages, pool.page_rows
            )
        self.scheduler = Scheduler(
            self.allocator,
            self.prefix_cache,
            batch_max_tokens=batch_max_tokens,
            chunked_prefill_size=None
            if args.disable_chunked_prefill
            else args.chunked_prefill_size,
            running_max_req_size=args.running_max_req_size,
            max_req_total_len=self.max_req_total_len,
            images=self.images,
        )
        self.overlap = not args.disable_overlap_schedule
        # The step launched last and not yet applied to the scheduler (overlap only).
        self._in_flight: tuple[StepPlan, PendingSamples | None] | None = None

    @property
    def is_multimodal(self) -> bool:
        return hasattr(self.runner.model, "encode_images")

    def add_request(self, request: Request) -> None:
        """Queues a request; raises RequestRejectedError if it can never fit."""
        prompt_len = request.num_prompt_tokens
        problem = request_size_problem(
            prompt_len,
            request.sampling_params.max_new_tokens,
            self.max_req_total_len,
            self.allocator.capacity,
        )
        if problem is not None:
            raise RequestRejectedError(problem)
        if request.images and self.images is None:
            raise RequestRejectedError("this model has no vision encoder: it cannot take images")
        if not _can_sample_before_min_new_tokens(request, self.vocab_size):
            raise RequestRejectedError(
                "every token this request may sample is banned before min_new_tokens (its "
                "banned ids, EOS and stop token ids): no token is left to sample"
            )
        # A safety net: the pool holds a whole --max_req_total_len of image tokens.
        if request.images and self.images is not None:
            tiles, held = self.images.pages_needed(request), self.images.index.num_pages
            if tiles > held:
                raise RequestRejectedError(
                    f"the request's images take {tiles} tiles of embeddings but the "
                    f"image-embedding cache holds {held} (--image_cache_gb, --cache_capacity)"
                )
        if self.args.disable_chunked_prefill and prompt_len > self.scheduler.batch_max_tokens:
            raise RequestRejectedError(
                f"the prompt has {prompt_len} tokens, more than --batch_max_tokens "
                f"({self.scheduler.batch_max_tokens}) with chunked prefill disabled"
            )
        self.scheduler.add_request(request)
        if request.images and self.images is not None:
            self.images.prefetch(request)

    def abort_request(self, request_id: str) -> Request | None:
        return self.scheduler.abort_request(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def has_work(self) -> bool:
        """Something to step for: unfinished requests, finished ones the runner still holds, or
        a launched step whose results are not applied yet."""
        return (
            self.has_unfinished()
            or self.scheduler.has_unsent_finishes
            or self._in_flight is not None
        )

    @property
    def waiting_for_tiles(self) -> bool:
        """Nothing runs and the last step admitted nothing: every waiting request's images are
        still being tiled. Stepping again is useful once a tiling finishes (`tiling_fd`) or a
        request arrives."""
        return self.scheduler.waiting_for_tiles and self._in_flight is None

    @property
    def tiling_fd(self) -> int | None:
        """A file descriptor readable when an image's tiling finishes (drain it after polling),
        for a loop that also waits on other inputs; None without a vision encoder."""
        return self.images.tiling.fileno() if self.images is not None else None

    def step(self, wait_for_tiles: bool = True) -> list[TokenUpdate]:
        """Launches one forward of whatever the scheduler picks and applies the results of the
        step before it (with overlap) or of this one (without); [] when there is nothing.

        A step never waits for images to be tiled. When it could admit nothing because of them
        and nothing runs, it blocks until one tiling finishes with `wait_for_tiles`; without it,
        it returns at once (the caller waits on `tiling_fd`)."""
        started = time.perf_counter()
        plan = self.scheduler.schedule()
        self.tp.broadcast_object(plan)  # the other ranks run the same plan (no-op at tp=1)
        launched = (plan, self.runner.launch(plan))
        previous, self._in_flight = self._in_flight, launched
        updates = self._apply(previous) if previous is not None else []
        if not self.overlap or plan.is_empty:  # nothing to overlap with: finish it now
            updates += self._apply(launched)
            self._in_flight = None
        elapsed = time.perf_counter() - started
        if wait_for_tiles and self.waiting_for_tiles and self.images is not None:
            self.images.wait_for_tiles()
        if elapsed > SLOW_STEP_SECONDS:
            logger.warning(
                "a step took %.2f s (launching %d sequence(s), %d new token(s), %d image(s) to "
                "encode; and finishing the step before it)",
                elapsed,
                len(plan.sequences),
                sum(seq.num_new_tokens for seq in plan.sequences),
                len(plan.encoder_inputs),
            )
        return updates

    def release_finished(self) -> None:
        """Releases the KV of the requests the last `step` finished: call it once their updates
        are sent (the next step does it otherwise)."""
        self.scheduler.release_finished()

    def forget_cached_state(self) -> None:
        """Empties the prefix and image-embedding caches and zeroes their counters and the ViT
        batch sizes not yet taken, as after start-up (after the warm-up request). Only while the
        engine has no work."""
        if self.has_work():
            raise RuntimeError("the caches can only be emptied while no request runs")
        self.prefix_cache.reset()
        self.prefix_cache.reset_stats()
        if self.images is not None:
            self.images.forget_all()
        self.take_vit_batch_sizes()

    def _apply(self, launched: tuple[StepPlan, PendingSamples | None]) -> list[TokenUpdate]:
        plan, pending = launched
        return self.scheduler.update(plan, self.runner.collect(pending))

    def take_vit_batch_sizes(self) -> list[int]:
        """Images per ViT forward since the previous call (for the batch-size histogram)."""
        return self.runner.take_vit_batch_sizes()

    def stats(self) -> EngineStats:
        cache = self.prefix_cache
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_capacity=self.allocator.capacity,
            kv_free=self.allocator.num_free,
            prefix_cache_tokens=cache.total_size,
            prefix_cache_evictable=cache.evictable_size,
            prefix_cache_hit_rate=cache.hit_rate,
            num_preemptions=self.scheduler.num_preemptions,
            image_cache_hits=self.images.index.hits if self.images else 0,
            image_cache_misses=self.images.index.misses if self.images else 0,
            image_cache_entries=len(self.images.index) if self.images else 0,
            image_cache_tiles=self.images.index.num_pages if self.images else 0,
            image_cache_tiles_free=self.images.index.num_free_pages if self.images else 0,
            images_in_prefix_cache=self.images.num_served_by_prefix_cache if self.images else 0,
            promised_tokens=self.scheduler.promised_tokens,
        )


def _can_sample_before_min_new_tokens(request: Request, vocab_size: int) -> bool:
    """False when every token a request may sample is banned until its min_new_tokens (its
    banned ids, EOS unless ignored, its stop token ids): its logits would be all -inf."""
    params = request.sampling_params
    banned = set(params.banned_token_ids)
    if params.min_new_tokens > 0:
        banned |= set(params.stop_token_ids)
        if not params.ignore_eos:
            banned |= request.eos_token_ids
    if params.allowed_token_ids:
        return not set(params.allowed_token_ids) <= banned
    return len({token for token in banned if token < vocab_size}) < vocab_size
