"""host_arrays_to_device: several small arrays through one transfer, each value and dtype kept."""

from __future__ import annotations

import pytest
import torch

from ocula.utils.device import STAGING_ALIGNMENT, host_arrays_to_device

DEVICES = [torch.device("cpu")]
if torch.cuda.is_available():
    DEVICES.append(torch.device("cuda"))


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_values_dtypes_and_alignment(device: torch.device) -> None:
    arrays = [
        ([3, -1, 2**40], torch.int64),  # -1: a placeholder token; 2**40: beyond int32
        ([], torch.int64),
        ([0, 7, 9], torch.int32),  # 12 bytes: the next array starts on the next 16
        ([0.5, 1.0, 0.1], torch.float32),
        ([5], torch.int64),
    ]
    tensors = host_arrays_to_device(arrays, device)
    assert len(tensors) == len(arrays)
    for tensor, (values, dtype) in zip(tensors, arrays, strict=True):
        assert tensor.device.type == device.type
        assert tensor.dtype == dtype
        assert tensor.is_contiguous()
        assert tensor.tolist() == torch.tensor(values, dtype=dtype).tolist()
        if device.type == "cuda":  # Triton specializes pointers on this alignment
            assert tensor.data_ptr() % STAGING_ALIGNMENT == 0


def test_no_arrays() -> None:
    assert host_arrays_to_device([], torch.device("cpu")) == []


def test_an_int32_value_out_of_range_is_refused() -> None:
    with pytest.raises(OverflowError):
        host_arrays_to_device([([2**31], torch.int32)], torch.device("cpu"))
