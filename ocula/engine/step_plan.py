"""The one value the scheduler hands to the model runner for a step, and what comes back.

It carries diffs, not whole requests: a request's sampling options travel once (in
`new_requests`), its slot table row is updated with only the slots that changed, and its state
is dropped on `finished_request_ids`. This is what another tensor-parallel rank would receive.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ocula.engine.image_inputs import EncoderInput, ImageSlice
from ocula.engine.outputs import TokenLogprob
from ocula.sampling.params import SamplingParams


@dataclass
class ScheduledSequence:
    request_id: str
    table_row: int
    start: int  # tokens of this request already in the KV pool
    token_ids: list[int]  # the tokens this step computes: positions [start, start + len)
    samples: bool  # this step reaches the end of the known tokens and samples the next one
    image_slices: list[ImageSlice] = field(default_factory=list)
    request_serial: int = -1  # `Request.serial` of the request it was planned for
    # Prompt logprobs: the prompt tokens that this step's first len(...) positions predict,
    # whose logprobs the runner computes (`Request.prompt_logprob_targets`).
    prompt_logprob_targets: list[int] | None = None

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class NewRequestData:
    """Sent once, when a request is first scheduled: what the runner needs to sample for it."""

    request_id: str
    sampling_params: SamplingParams
    prompt_token_ids: list[int]
    eos_token_ids: frozenset[int]


# SlotTableWrites.flatten writes up to this many ranges one by one.
FEW_RANGES = 4


@dataclass
class SlotTableWrites:
    """`slot_table[row, start + j] = slots[j]` for every (row, start, slots) added.

    Kept as plain Python values plus the slot tensors and turned into index tensors once, by
    `flatten`: a decode step adds one entry per running request, so per-entry tensor work would
    dominate the scheduler's time. Pickled (the step plan's broadcast to the other
    tensor-parallel ranks) as the one flat array of `flatten`: pickling one small tensor per
    entry cost about 70 us each, several ms per decode step at batch 64.
    """

    rows: list[int] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    slots: list[torch.Tensor] = field(default_factory=list)  # int64 CPU tensors
    # Single cells (a decode step's one new token per request), kept as plain ints.
    cell_rows: list[int] = field(default_factory=list)
    cell_cols: list[int] = field(default_factory=list)
    cell_slots: list[int] = field(default_factory=list)
    _flat: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def add(self, row: int, start: int, slots: torch.Tensor) -> None:
        if slots.shape[0] == 0:
            return
        self.rows.append(row)
        self.starts.append(start)
        self.slots.append(slots)
        self._flat = None

    def add_cell(self, row: int, col: int, slot: int) -> None:
        """`slot_table[row, col] = slot`: `add` for one cell, without a tensor."""
        self.cell_rows.append(row)
        self.cell_cols.append(col)
        self.cell_slots.append(slot)
        self._flat = None

    def flatten(self) -> torch.Tensor | None:
        """[3, cells] int64 CPU tensor of (row, col, slot) per written cell, one host-to-device
        copy in all; None if empty. Built with numpy: torch's CPU ops on such small tensors cost
        far more (repeat_interleave alone took ~0.4 ms per call on a GPU host)."""
        if self._flat is not None:
            return self._flat
        if not self.rows and not self.cell_rows:
            return None
        if len(self.rows) <= FEW_RANGES:
            # Entry by entry: fewer numpy calls than the vectorized form below for a step's
            # one or two ranges (a prompt's chunk, a cached prefix): 12 against 29 us for two.
            ranges = sum(slots.shape[0] for slots in self.slots)
            flat = np.empty((3, ranges + len(self.cell_rows)), dtype=np.int64)
            at = 0
            for row, start, slots in zip(self.rows, self.starts, self.slots, strict=True):
                end = at + slots.shape[0]
                flat[0, at:end] = row
                flat[1, at:end] = np.arange(start, start + end - at)
                flat[2, at:end] = slots.numpy()
                at = end
        else:
            lengths = np.fromiter((s.shape[0] for s in self.slots), np.int64, len(self.slots))
            ranges = int(lengths.sum())
            flat = np.empty((3, ranges + len(self.cell_rows)), dtype=np.int64)
            flat[0, :ranges] = np.repeat(np.asarray(self.rows, dtype=np.int64), lengths)
            # Column of each cell: its entry's start plus its offset inside the entry.
            entry_begin = np.cumsum(lengths) - lengths
            offsets = np.arange(ranges, dtype=np.int64) - np.repeat(entry_begin, lengths)
            flat[1, :ranges] = np.repeat(np.asarray(self.starts, dtype=np.int64), lengths) + offsets
            flat[2, :ranges] = torch.cat(self.slots).numpy()
        # Single cells after the ranges: every cell of a plan is distinct (duplicate indices
        # would leave the device's scatter free to keep either value).
        flat[0, ranges:] = self.cell_rows
        flat[1, ranges:] = self.cell_cols
        flat[2, ranges:] = self.cell_slots
        self._flat = torch.from_numpy(flat)
        return self._flat

    def __getstate__(self) -> dict[str, Any]:
        flat = self.flatten()
        return {"flat": None if flat is None else flat.numpy()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.rows, self.starts, self.slots = [], [], []
        self.cell_rows, self.cell_cols, self.cell_slots = [], [], []
        flat = state["flat"]
        self._flat = None if flat is None else torch.from_numpy(flat)


@dataclass
class StepPlan:
    sequences: list[ScheduledSequence] = field(default_factory=list)
    new_requests: list[NewRequestData] = field(default_factory=list)
    finished_request_ids: list[str] = field(default_factory=list)
    table_writes: SlotTableWrites = field(default_factory=SlotTableWrites)
    # Image embeddings: drop these keys first, then encode these images, then run the forward.
    encoder_frees: list[str] = field(default_factory=list)
    encoder_inputs: list[EncoderInput] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.sequences)

    @property
    def is_empty(self) -> bool:
        return not self.sequences


@dataclass
class SampledToken:
    """The runner's answer for one sampling sequence of the plan, in plan order. A request's
    first token also carries its prompt's logprobs when it asked for them: one entry per prompt
    position, None for the first."""

    request_id: str
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
