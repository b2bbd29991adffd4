"""What the decode and whole-step CUDA graphs compute from their static inputs, run eagerly on the
CPU: the same tensor operations the graphs capture (placeholders read from `last_tokens`, KV
slots looked up in the slot table, image rows gathered from the pool), on values staged the way
a step stages them. Capture and replay themselves need a GPU (tests/gpu)."""

from __future__ import annotations

import torch
from torch import nn

from ocula.engine.cuda_graphs import DecodeGraphs
from ocula.engine.image_inputs import ImageSlice
from ocula.engine.step_plan import ScheduledSequence
from ocula.engine.whole_step_graphs import WholeStepGraphs, step_inputs

ROWS, WIDTH, PADDING_ROW = 6, 32, 6


def slot_table() -> torch.Tensor:
    """Row r holds slots 100 * (r + 1) + column; the padding row (the last) all zeros."""
    table = torch.zeros((ROWS + 1, WIDTH), dtype=torch.int32)
    for row in range(ROWS):
        table[row] = 100 * (row + 1) + torch.arange(WIDTH, dtype=torch.int32)
    return table


def decode_seq(row: int, start: int, token: int, **overrides) -> ScheduledSequence:
    fields = {"token_ids": [token], "samples": True, **overrides}
    return ScheduledSequence(f"r{row}", row, start, **fields)


def test_decode_graphs_take_single_token_sampling_steps_without_images() -> None:
    graphs = DecodeGraphs(nn.Module(), None, slot_table(), PADDING_ROW, 4, torch.zeros(ROWS + 1))
    assert graphs.takes([decode_seq(0, 5, 1), decode_seq(1, 9, 2)])
    assert not graphs.takes([decode_seq(r, 5, 1) for r in range(5)])  # past the largest bucket
    assert not graphs.takes([decode_seq(0, 5, 1, token_ids=[1, 2])])
    assert not graphs.takes([decode_seq(0, 5, 1, samples=False)])
    image = ImageSlice("img", 3, 4, 0)
    assert not graphs.takes([decode_seq(0, 5, 1, image_slices=[image])])


def test_decode_graph_inputs_read_placeholders_and_slots() -> None:
    table = slot_table()
    last_tokens = torch.arange(ROWS + 1, dtype=torch.int64) + 1000
    graphs = DecodeGraphs(nn.Module(), None, table, PADDING_ROW, 4, last_tokens)
    sequences = [decode_seq(2, 7, 41), decode_seq(4, 11, -1)]  # -1: sampled by the step before
    graphs.inputs.stage(
        {
            "input_ids": [s.token_ids[0] for s in sequences],
            "positions": [s.start for s in sequences],
            "seq_lens": [s.start + 1 for s in sequences],
            "table_rows": [s.table_row for s in sequences],
        }
    )
    batch = graphs._static_batch(4)  # bucket 4: two padding rows
    assert batch.input_ids.tolist() == [41, 1004, 0, 0]
    assert batch.positions.tolist() == [7, 11, 0, 0]
    assert batch.seq_lens.tolist() == [8, 12, 1, 1]
    assert batch.table_rows.tolist() == [2, 4, PADDING_ROW, PADDING_ROW]
    assert batch.out_slots.tolist() == [307, 511, 0, 0]  # padding rows: the scratch slot
    assert batch.query_start_loc.tolist() == [0, 1, 2, 3, 4]


def test_whole_step_inputs_look_up_slots_and_gather_image_rows() -> None:
    table = slot_table()
    pool = torch.arange(40, dtype=torch.float32).repeat_interleave(3).view(40, 3)  # row i: i
    graphs = WholeStepGraphs(
        nn.Module(), None, None, table, PADDING_ROW, 16, lambda rows: pool.index_select(0, rows)
    )
    image_rows = (torch.tensor([1, 2]).numpy(), torch.tensor([30, 31]).numpy())
    graphs.inputs.stage(step_inputs([5, 6, 7], start=20, table_row=3, image_rows=image_rows))
    batch = graphs._batch(16)
    assert batch.input_ids.tolist() == [5, 6, 7] + [0] * 13
    assert batch.positions.tolist() == [20, 21, 22] + [0] * 13
    assert batch.out_slots.tolist() == [420, 421, 422] + [0] * 13
    assert batch.query_start_loc.tolist() == [0, 3]
    assert batch.seq_lens.tolist() == [23] and batch.table_rows.tolist() == [3]
    assert batch.spliced_rows.tolist() == [1, 2] + [-1] * 14  # -1: skipped by the splice
    assert batch.spliced_embeds[:2, 0].tolist() == [30.0, 31.0]
    # A text-only step after it: no image rows left over from the one before.
    graphs.inputs.stage(step_inputs([9], start=0, table_row=1, image_rows=None))
    batch = graphs._batch(16)
    assert batch.spliced_rows.tolist() == [-1] * 16
    assert batch.out_slots.tolist() == [200] + [0] * 15
