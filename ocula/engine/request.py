"""The request object that flows through the engine and owns its counters and KV slots."""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch

from ocula.sampling.params import SamplingParams

# Stands in `Request.token_ids` for a token that a step in flight is sampling: the scheduler
# appends it when it schedules the sampling, and `Scheduler.update` replaces it with the token.
# The model runner reads such a token from the device (the step before sampled it there).
PLACEHOLDER_TOKEN = -1

_serials = itertools.count()


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_new_tokens or the request length limit
    ABORT = "abort"  # cancelled by the client or the server


@dataclass
class ImageSpan:
    """An image inside a request: `length` placeholder tokens from position `offset`, whose
    embedding rows come from the cache entry `key` (MD5 of the bytes + preprocessing)."""

    key: str
    offset: int
    length: int
    image_bytes: bytes | None = None  # to preprocess on a cache miss
    image_base64: str | None = None  # the bytes' base64 (checked by the front), when not given
    tiling: Any = None  # the InternVLImageConfig that preprocessing must use
    pixel_values: Any = None  # [tiles, 3, H, W]: uint8 tiles or float32 pixel values
    payload_key: str | None = None  # SHA-256 of the bytes: the payload's identity in transit

    def cache_keys(self) -> list[tuple[str, int]]:
        """Prefix-cache items of the span: never equal to a token id or another image's."""
        return [(self.key, i) for i in range(self.length)]


class Request:
    """One sequence being generated.

    Invariants the scheduler maintains:
    - `token_ids` is the prompt followed by every generated token; the last one or two may be
      PLACEHOLDER_TOKEN while steps that sample them are in flight.
    - the K/V of `token_ids[:num_computed_tokens]` are in the pool, at `kv_slots`; between
      `schedule()` and `update()` it also holds the slots of the tokens being computed, up to
      `num_scheduled_tokens`;
    - the first `num_tree_tokens` of those slots belong to the prefix cache and are locked through
      `prefix_node`; the rest belong to the request and are freed or handed to the cache when it
      stops running.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_ids: frozenset[int],
        images: list[ImageSpan] | None = None,
    ) -> None:
        self.request_id = request_id
        # Unique per Request object: a step in flight may still carry a finished request whose
        # id a new request has taken since; results go to the request they were planned for.
        self.serial = next(_serials)
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = eos_token_ids
        self.stop_token_ids = frozenset(sampling_params.stop_token_ids or ())
        self.stop_token_sequences = [tuple(s) for s in sampling_params.stop_token_sequences or ()]
        self.images = sorted(images or [], key=lambda span: span.offset)
        self.held_image_keys: list[str] = []  # embedding-cache entries this request holds
        self.arrival_time = time.monotonic()
        self.first_scheduled_time: float | None = None

        self.status = RequestStatus.WAITING
        self.finish_reason: FinishReason | None = None
        # The stop token id, or stop token sequence (a list), that ended it.
        self.stop_reason: int | str | list[int] | None = None
        self.num_computed_tokens = 0
        self.num_scheduled_tokens = 0  # computed plus those the step in flight computes
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache at first admission
        self.num_preemptions = 0
        self.table_row: int | None = None
        self.prefix_node: Any = None
        self.num_tree_tokens = 0
        # The prompt was handed (or queued, see RequestKV) to the prefix cache since admission.
        self.prefill_cached = False
        # Set once the first token, which carries the prompt's logprobs, is applied.
        self.prompt_logprobs_sent = False
        self._kv_slots = torch.empty(0, dtype=torch.int64)
        self._kv_slots_numpy = self._kv_slots.numpy()  # the same memory, for one-slot writes

    # -- tokens -------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def promised_tokens(self) -> int:
        """The most tokens the request can hold: its prompt and max_new_tokens."""
        return self.num_prompt_tokens + self.sampling_params.max_new_tokens

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.sampling_params.prompt_logprobs is not None and not self.prompt_logprobs_sent

    @property
    def reads_prefix_cache(self) -> bool:
        """False for a request that computes its whole prompt: one that wants its prompt's
        logprobs (every position's hidden state), or that asked to skip the cache."""
        return not (self.wants_prompt_logprobs or self.sampling_params.skip_prefix_cache)

    def prompt_logprob_targets(self, start: int, end: int) -> list[int] | None:
        """The prompt tokens that positions [start, end) predict (position p predicts p + 1),
        while the request still wants its prompt's logprobs; None when there are none."""
        if not self.wants_prompt_logprobs:
            return None
        last = min(end, self.num_prompt_tokens - 1)
        return self.token_ids[start + 1 : last + 1] if last > start else None

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def check_stop(self, position: int, max_total_len: int) -> FinishReason | None:
        """Why the request stops at its token `token_ids[position]` (a generated one), if it
        does (sets `stop_reason`). Tokens after `position` (placeholders of a step in flight)
        are not counted."""
        params = self.sampling_params
        token_id = self.token_ids[position]
        num_output = position + 1 - self.num_prompt_tokens
        if num_output >= params.min_new_tokens:
            sequence = self._stop_sequence_ending_at(position, num_output)
            if sequence is not None:  # before EOS, as LightLLM checks them
                self.stop_reason = list(sequence)
                return FinishReason.STOP
            if not params.ignore_eos and token_id in self.eos_token_ids:
                return FinishReason.STOP
            if token_id in self.stop_token_ids:
                self.stop_reason = token_id
                return FinishReason.STOP
        return self.length_stop(position, max_total_len)

    def _stop_sequence_ending_at(self, position: int, num_output: int) -> tuple[int, ...] | None:
        """The first stop token sequence that the output's tokens up to `position` end with."""
        for sequence in self.stop_token_sequences:
            length = len(sequence)
            if length > num_output or sequence[-1] != self.token_ids[position]:
                continue
            if tuple(self.token_ids[position + 1 - length : position + 1]) == sequence:
                return sequence
        return None

    def length_stop(self, position: int, max_total_len: int) -> FinishReason | None:
        """LENGTH when the token at `position` is the last one the limits allow, whatever it
        is (known before it is sampled)."""
        num_output = position + 1 - self.num_prompt_tokens
        if num_output >= self.sampling_params.max_new_tokens or position + 1 >= max_total_len:
            return FinishReason.LENGTH
        return None

    def drop_placeholders(self) -> None:
        """Removes the trailing tokens that steps in flight were to sample (when it stops)."""
        while self.token_ids and self.token_ids[-1] == PLACEHOLDER_TOKEN:
            self.token_ids.pop()

    def first_token_queue_seconds(self, position: int) -> float | None:
        """Arrival to first scheduled step, reported with the first generated token only (the
        one at `position`)."""
        if position != self.num_prompt_tokens or self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time

    def cache_key(self, end: int) -> list[Hashable]:
        """Prefix-cache key of positions [0, end): token ids, except that image placeholders
        are keyed by (image key, offset in the image), so different images never share KV."""
        key: list[Hashable] = list(self.token_ids[:end])
        for span in self.images:
            if span.offset >= end:
                break
            stop = min(end, span.offset + span.length)
            key[span.offset : stop] = span.cache_keys()[: stop - span.offset]
        return key

    # -- KV slots -----------------------------------------------------------------------------
    @property
    def kv_slots(self) -> torch.Tensor:
        """Slots of the computed tokens, in order (a view; int64, CPU)."""
        return self._kv_slots[: self.num_computed_tokens]

    def in_flight_slots(self) -> torch.Tensor:
        """Slots allocated for tokens a step is computing but has not reported yet."""
        return self._kv_slots[
            self.num_computed_tokens : max(self.num_scheduled_tokens, self.num_computed_tokens)
        ]

    def set_prefix_slots(self, slots: torch.Tensor) -> None:
        """Replaces the slots of the first len(slots) tokens (a prefix-cache hit or re-keying)."""
        self._reserve(len(slots))
        self._kv_slots[: len(slots)] = slots

    def put_new_slots(self, start: int, slots: torch.Tensor) -> None:
        """Records the slots of tokens [start, start + len(slots)), computed by the next step."""
        self._reserve(start + len(slots))
        self._kv_slots[start : start + len(slots)] = slots

    def put_new_slot(self, position: int, slot: int) -> None:
        """`put_new_slots` for one token."""
        self._reserve(position + 1)
        self._kv_slots_numpy[position] = slot  # a numpy store: a tensor one costs ~10x more

    def _reserve(self, size: int) -> None:
        if size <= self._kv_slots.numel():
            return
        grown = torch.empty(max(size, 2 * self._kv_slots.numel(), 16), dtype=torch.int64)
        grown[: self._kv_slots.numel()] = self._kv_slots
        self._kv_slots = grown
        self._kv_slots_numpy = grown.numpy()

    def reset_for_recompute(self) -> None:
        """Back to waiting with no KV: the tokens generated so far are recomputed on resume."""
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_scheduled_tokens = 0
        self.num_tree_tokens = 0
        self.prefix_node = None
        self.table_row = None
        self.prefill_cached = False
        self.num_preemptions += 1
