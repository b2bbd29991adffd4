"""Continuous batching over the paged KV cache.

Each step the scheduler builds one varlen batch under a token budget (`batch_max_tokens`):
1. running requests first, in admission order: one token each for those decoding, the next
   chunk for those still prefilling (prompts longer than `chunked_prefill_size`, or tokens to
   recompute after a preemption);
2. then waiting requests, first come first served, while the budget, the row limit
   (`running_max_req_size`), the KV pool and the image-embedding pool allow. A new request first
   looks its prompt up in the prefix cache and computes only the rest.

KV slots are taken from the allocator, evicting unreferenced prefix-cache entries when it runs
dry. When a running request still cannot get a slot, the most recently admitted request is
preempted: its computed KV goes to the prefix cache (or is freed), and it waits at the head of the
queue to be recomputed, generated tokens included. No request is dropped.

Overlap: `schedule()` may run again before `update()` has the previous step's tokens (the engine
core prepares step n+1 while the device runs step n). A sequence that samples appends
PLACEHOLDER_TOKEN to its request at once, so the next plan already decodes it (the runner reads
the token from the device), and counts run from `num_scheduled_tokens`; a request whose last
token by the length limits is in flight is not scheduled again. `update()` of step n replaces
the placeholder; a request that stops there (EOS, a stop token) gives its KV up once that
step's outputs are sent (`release_finished`), and its sequence in step n+1, already launched,
is ignored when that step is applied.
"""

from __future__ import annotations

from collections import deque

from ocula.engine.image_inputs import ImageScheduler, PendingImage
from ocula.engine.outputs import TokenUpdate
from ocula.engine.plan_chunks import (
    chunk_size,
    is_decode,
    last_token_in_flight,
    plan_chunk,
    plan_decode,
    plan_first_admission,
)
from ocula.engine.prefix_cache import RadixCache
from ocula.engine.request import PLACEHOLDER_TOKEN, FinishReason, Request, RequestStatus
from ocula.engine.request_kv import DecodeSlots, RequestKV
from ocula.engine.slot_allocator import SlotAllocator
from ocula.engine.step_plan import SampledToken, StepPlan
from ocula.engine.tiling_admission import TilingGate


class Scheduler:
    def __init__(
        self,
        allocator: SlotAllocator,
        prefix_cache: RadixCache,
        batch_max_tokens: int,
        chunked_prefill_size: int | None,
        running_max_req_size: int,
        max_req_total_len: int,
        images: ImageScheduler | None = None,
    ) -> None:
        self.allocator = allocator
        self.images = images
        self.prefix_cache = prefix_cache
        self.batch_max_tokens = batch_max_tokens
        self.chunked_prefill_size = chunked_prefill_size  # None: whole prompts only
        self.max_req_total_len = max_req_total_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._free_rows = list(range(running_max_req_size - 1, -1, -1))
        self._finished_since_last_plan: list[str] = []
        self.kv = RequestKV(allocator, prefix_cache)
        self.num_preemptions = 0
        self._admitted_images: list[PendingImage] = []  # this plan's, until `finish_plan`
        self._finished_holding_kv: list[Request] = []  # see `release_finished`
        self.promised_tokens = 0  # prompt + max_new_tokens of every unfinished request
        # The last plan admitted nothing and nothing runs: the waiting requests' tiles are being
        # made (the engine then waits for a tiling to finish, or for a new request).
        self.waiting_for_tiles = False

    # -- queue management ---------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)
        self.promised_tokens += request.promised_tokens

    def abort_request(self, request_id: str) -> Request | None:
        """Stops a request wherever it is and releases its KV; None if it is unknown or done."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        if request.status == RequestStatus.WAITING:
            self._leave_waiting(request)
        else:
            self.running.remove(request)
            self._release_kv(request)
        self._finish(request, FinishReason.ABORT)
        return request

    def _leave_waiting(self, request: Request) -> None:
        """Takes a request out of the waiting queue for good, with any tiles prefetched for it."""
        self.waiting.remove(request)
        if self.images is not None:
            self.images.drop_prefetched(request)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    @property
    def has_unsent_finishes(self) -> bool:
        """Requests finished since the last plan whose runner state the next plan will drop."""
        return bool(self._finished_since_last_plan)

    @property
    def kv_capacity(self) -> int:
        return self.allocator.capacity

    # -- scheduling ---------------------------------------------------------------------------
    def release_finished(self) -> None:
        """Releases the KV of the requests `update` finished, which it leaves for after their
        last token is sent (the engine loop's call); the next plan does it first otherwise."""
        for request in self._finished_holding_kv:
            self._release_kv(request)
        self._finished_holding_kv = []

    def schedule(self) -> StepPlan:
        self.release_finished()
        self.waiting_for_tiles = False
        plan = StepPlan(finished_request_ids=self._finished_since_last_plan)
        self._finished_since_last_plan = []
        for row, start, slots in self.kv.start_plan():
            plan.table_writes.add(row, start, slots)
        if self.images is not None:
            plan.encoder_frees += self.images.start_plan()
        budget = self.batch_max_tokens
        preempted = False
        decodes = sum(
            1
            for r in self.running
            if is_decode(r) and not last_token_in_flight(r, self.max_req_total_len)
        )
        decode_slots = DecodeSlots(self.kv, decodes)
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            if last_token_in_flight(request, self.max_req_total_len):
                index += 1
                continue
            if is_decode(request):
                slot = decode_slots.take()
                if slot is not None:
                    plan_decode(plan, request, slot)
                    self._release_embedded_images(request)  # a prompt ending in an image
                    budget -= 1
                    index += 1
                    continue
            num_new = chunk_size(request, budget, self.chunked_prefill_size)
            if num_new == 0:
                break
            slots = self.kv.allocate(num_new)
            if slots is None:  # the slots held for later decodes first, as single allocs would
                decode_slots.give_back()
                slots = self.kv.allocate(num_new)
            while slots is None:
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
                slots = self.kv.allocate(num_new)
            if slots is None:
                break
            plan_chunk(plan, request, slots)
            self._release_embedded_images(request)
            budget -= num_new
            index += 1
        decode_slots.give_back()
        if not preempted:
            self._admit_waiting(plan, budget)
        if self.images is not None:
            # A request whose token a step in flight samples cannot be admitted yet (and may end).
            admissible = (r for r in self.waiting if r.token_ids[-1] != PLACEHOLDER_TOKEN)
            plan.encoder_inputs = self.images.finish_plan(self._admitted_images, admissible)
            self._admitted_images = []
        return plan

    def _admit_waiting(self, plan: StepPlan, budget: int) -> None:
        untiled: list[Request] = []  # passed over for tiling (`TilingGate`); keep their places
        rows, idle = len(self._free_rows), not self.running
        tiling = TilingGate.for_plan(
            self.images, self.kv, self.waiting, rows, budget, self.chunked_prefill_size, idle
        )
        while self.waiting and budget > 0 and self._free_rows:
            request = self.waiting[0]
            if request.token_ids[-1] == PLACEHOLDER_TOKEN:  # preempted while a step samples it
                break
            prefix_len = self.kv.match_prefix(request)
            if tiling.must_wait(request, prefix_len):
                self.kv.unlock_prefix(request)
                untiled.append(self.waiting.popleft())
                continue
            num_new = chunk_size(request, budget, self.chunked_prefill_size)
            # Admit only if this chunk fits and every running request can still take one more
            # token next step (preemption covers the rest), and its new images fit the
            # embedding pool (the ones in use free up as their requests' prefills pass them).
            headroom = len(self.running) + 1
            available = self.allocator.num_free + self.prefix_cache.evictable_size
            images_fit = not request.images or (
                self.images is not None and self.images.can_admit(request, prefix_len)
            )
            if num_new == 0 or available < num_new + headroom or not images_fit:
                self.kv.unlock_prefix(request)
                break
            slots = self.kv.allocate(num_new)
            if slots is None:
                self.kv.unlock_prefix(request)
                break
            self.waiting.popleft()
            if request.reads_prefix_cache:  # one that does not is no lookup
                self.prefix_cache.count_lookup(request.num_tokens - 1, prefix_len)
            request.status = RequestStatus.RUNNING
            request.table_row = self._free_rows.pop()
            if request.first_scheduled_time is None:
                plan_first_admission(plan, request, prefix_len)
            plan.table_writes.add(request.table_row, 0, request.kv_slots.clone())
            if request.images:
                self._admit_images(plan, request, prefix_len)
            self.running.append(request)
            plan_chunk(plan, request, slots)
            self._release_embedded_images(request)
            budget -= num_new
        self.waiting.extendleft(reversed(untiled))
        self.waiting_for_tiles = bool(untiled) and not self.running

    def _admit_images(self, plan: StepPlan, request: Request, prefix_len: int) -> None:
        if self.images is None:
            raise RuntimeError("a request with images reached an engine without a vision encoder")
        to_encode, evicted = self.images.admit(request, prefix_len)
        self._admitted_images += to_encode
        plan.encoder_frees += evicted

    def _release_embedded_images(self, request: Request) -> None:
        if self.images is not None:
            self.images.release_once_planned(request)

    def _release_kv(self, request: Request) -> None:
        """Gives up a request's slots (to the prefix cache when it is on) and its table row."""
        self.kv.release(request)
        if self.images is not None:
            self.images.release(request)
        if request.table_row is not None:
            self._free_rows.append(request.table_row)
        request.table_row = None
        request.prefix_node = None

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._release_kv(request)
        request.reset_for_recompute()
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    def _finish(self, request: Request, reason: FinishReason) -> None:
        request.drop_placeholders()
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        del self.requests[request.request_id]
        self.promised_tokens -= request.promised_tokens
        if request.first_scheduled_time is not None:
            self._finished_since_last_plan.append(request.request_id)

    # -- results ------------------------------------------------------------------------------
    def update(self, plan: StepPlan, sampled: list[SampledToken]) -> list[TokenUpdate]:
        """Applies a step's results: advances counters, fills in tokens, finishes requests.

        `sampled` has one entry per sequence of `plan` with `samples` set, in plan order. A
        request preempted after this step was planned still gets its token (and may stop on
        it); one aborted or finished since is skipped.
        """
        updates: list[TokenUpdate] = []
        sampled_iter = iter(sampled)
        for seq in plan.sequences:
            token = next(sampled_iter) if seq.samples else None
            request = self.requests.get(seq.request_id)
            if request is None or request.serial != seq.request_serial:
                # Aborted, or stopped by the step before (this step ran it anyway); its id may
                # already belong to a new request.
                continue
            running = request.status == RequestStatus.RUNNING
            position = seq.start + seq.num_new_tokens  # where the sampled token goes
            if running:
                request.num_computed_tokens = position
            if token is None:
                continue
            request.token_ids[position] = token.token_id
            if running and self.prefix_cache.enabled and not request.prefill_cached:
                # The prompt (or the recomputed sequence) is complete: share it with requests
                # that arrive while this one is still decoding (from the next plan on).
                self.kv.cache_prompt_at_next_plan(request)
                request.prefill_cached = True
            reason = request.check_stop(position, self.max_req_total_len)
            updates.append(
                TokenUpdate(
                    request.request_id,
                    token.token_id,
                    token.logprob,
                    token.top_logprobs,
                    finish_reason=reason,
                    stop_reason=request.stop_reason,
                    num_cached_tokens=request.num_cached_tokens,
                    queued_seconds=request.first_token_queue_seconds(position),
                    prompt_logprobs=token.prompt_logprobs,
                )
            )
            if token.prompt_logprobs is not None:
                request.prompt_logprobs_sent = True
            if reason is None:
                continue
            if running:
                self.running.remove(request)
                self._finished_holding_kv.append(request)
            else:
                self._leave_waiting(request)
            self._finish(request, reason)  # drops the placeholder the next step samples
        return updates
