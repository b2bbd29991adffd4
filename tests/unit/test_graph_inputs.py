"""StaticInputBlock: a CUDA graph's static inputs as views of one block, refilled by one copy a
step; the whole-step graphs' values for one sequence; the slot table's writes in one transfer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ocula.engine.graph_inputs import (
    FIELD_ALIGNMENT,
    STAGING_BUFFERS,
    InputField,
    StaticInputBlock,
)
from ocula.engine.plan_batch import write_slot_table
from ocula.engine.whole_step_graphs import step_inputs

DEVICES = [torch.device("cpu")]
if torch.cuda.is_available():
    DEVICES.append(torch.device("cuda"))

FIELDS = [
    InputField("input_ids", 5, torch.int64),
    InputField("rows", 5, torch.int64, pad=9),
    InputField("span", 3, torch.int32),  # 12 bytes: the next field starts on the next 16
    InputField("spliced", 4, torch.int64, pad=-1),
]


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_views_start_at_their_padding_aligned_at_fixed_addresses(device: torch.device) -> None:
    block = StaticInputBlock(FIELDS, device)
    base = block.block.data_ptr()
    addresses = {}
    for field in FIELDS:
        view = block.view(field.name)
        assert view.dtype == field.dtype and view.shape == (field.length,)
        assert view.device.type == device.type
        assert (view.data_ptr() - base) % FIELD_ALIGNMENT == 0
        assert view.tolist() == [field.pad] * field.length
        addresses[field.name] = view.data_ptr()
    block.stage({"input_ids": [1, 2]})
    assert {f.name: block.view(f.name).data_ptr() for f in FIELDS} == addresses


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_a_step_fills_each_field_then_its_padding(device: torch.device) -> None:
    block = StaticInputBlock(FIELDS, device)
    block.stage(
        {
            "input_ids": [11, -1, 2**40],  # a placeholder; a value beyond int32
            "rows": np.array([3, 3, 4]),
            "span": [0, 3, 7],
            "spliced": [0, 2, 1, 3],
        }
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    assert block.view("input_ids").tolist() == [11, -1, 2**40, 0, 0]
    assert block.view("rows").tolist() == [3, 3, 4, 9, 9]
    assert block.view("span").tolist() == [0, 3, 7]
    assert block.view("spliced").tolist() == [0, 2, 1, 3]
    # A smaller step: nothing of the one before is left, fields not named are back to padding.
    block.stage({"input_ids": [5]})
    if device.type == "cuda":
        torch.cuda.synchronize()
    assert block.view("input_ids").tolist() == [5, 0, 0, 0, 0]
    assert block.view("rows").tolist() == [9] * 5
    assert block.view("span").tolist() == [0, 0, 0]
    assert block.view("spliced").tolist() == [-1] * 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the pinned staging copies are CUDA's")
def test_steps_staged_ahead_of_the_gpu_each_land_in_turn() -> None:
    # The host stages more steps than the block has pinned copies while the GPU is still busy:
    # a copy is rewritten only after the transfer queued from it has run, so each step's
    # clone (queued right after its transfer) sees that step's values.
    block = StaticInputBlock(FIELDS, torch.device("cuda"))
    torch.cuda._sleep(100_000_000)
    clones = []
    for step in range(3 * STAGING_BUFFERS):
        block.stage({"input_ids": [step, step + 1], "rows": [step]})
        clones.append(torch.cat([block.view("input_ids"), block.view("rows")]))
    torch.cuda.synchronize()
    expected = [[step, step + 1, 0, 0, 0, step, 9, 9, 9, 9] for step in range(3 * STAGING_BUFFERS)]
    assert [clone.tolist() for clone in clones] == expected


def test_more_values_than_a_field_holds_are_refused() -> None:
    block = StaticInputBlock(FIELDS, torch.device("cpu"))
    with pytest.raises(ValueError, match="6 values for the 5 of static input 'rows'"):
        block.stage({"rows": list(range(6))})
    with pytest.raises(KeyError):
        block.stage({"no_such_field": [1]})


def test_only_integer_fields() -> None:
    with pytest.raises(ValueError, match="int64 or int32"):
        StaticInputBlock([InputField("x", 4, torch.float32)], torch.device("cpu"))


def test_whole_step_inputs_of_one_sequence() -> None:
    values = step_inputs([7, 8, 9], start=40, table_row=2, image_rows=None)
    assert list(values["input_ids"]) == [7, 8, 9]
    assert list(values["positions"]) == [40, 41, 42]
    assert list(values["token_rows"]) == [2, 2, 2]
    assert values["query_start_loc"] == [0, 3]
    assert values["seq_len"] == [43]
    assert values["table_row"] == [2]
    assert "spliced_rows" not in values
    rows, sources = np.array([1, 2]), np.array([30, 31])
    with_image = step_inputs([7, 8, 9], 0, 2, (rows, sources))
    assert with_image["spliced_rows"] is rows and with_image["image_sources"] is sources


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_slot_table_writes_land_as_int32(device: torch.device) -> None:
    table = torch.zeros((3, 6), dtype=torch.int32, device=device)
    writes = torch.tensor([[0, 0, 2], [1, 2, 5], [17, 2**30, 3]])  # rows, columns, slots
    write_slot_table(table, writes)
    write_slot_table(table, None)
    expected = torch.zeros((3, 6), dtype=torch.int32)
    expected[0, 1], expected[0, 2], expected[2, 5] = 17, 2**30, 3
    assert torch.equal(table.cpu(), expected)
