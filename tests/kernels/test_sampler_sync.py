"""One sampling step (building the `SamplingBatch`, then the sampler) never waits for the device.

On CUDA the step runs under torch.cuda.set_sync_debug_mode("error"), which raises on any
synchronizing call (.item(), .tolist(), bool(tensor), nonzero, a blocking copy...). On CPU, where
nothing can synchronize, a dispatch mode rejects the operations that would read data back to the
host or give an output whose shape depends on the data, and Tensor.tolist / numpy are patched.
The only read-back of a step is the runner's final copy of the results, outside this code.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ocula.sampling.batch import SamplingBatch, seeded_generator
from ocula.sampling.params import SamplingParams
from ocula.sampling.sampler import Sampler, SamplerOutput

VOCAB = 1000
aten = torch.ops.aten

CASES: dict[str, list[SamplingParams]] = {
    "greedy": [SamplingParams(temperature=0)] * 3,
    "top_k": [SamplingParams(top_k=5), SamplingParams(top_k=50, temperature=0.7)],
    "top_p": [SamplingParams(top_p=0.8), SamplingParams(top_p=0.95, temperature=1.3)],
    "top_k_and_top_p": [SamplingParams(top_k=20, top_p=0.8), SamplingParams(top_k=-1)],
    "min_p": [SamplingParams(min_p=0.1), SamplingParams(min_p=0.05, top_k=10)],
    "penalties": [
        SamplingParams(repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.3),
        SamplingParams(temperature=0, repetition_penalty=1.1, min_new_tokens=10),
    ],
    "seeded": [SamplingParams(seed=1), SamplingParams(seed=2, top_p=0.9), SamplingParams()],
    "logprobs": [SamplingParams(logprobs=5), SamplingParams(temperature=0, logprobs=2)],
    "logit_bias": [
        SamplingParams(temperature=0, logit_bias={3: 5.0, 7: -100.0}),
        SamplingParams(top_k=5, logit_bias={1: 2.0}, min_new_tokens=10),
    ],
    "lightllm": [
        SamplingParams(repetition_penalty=1.2, presence_penalty=3.0, penalty_scope="output"),
        SamplingParams(frequency_penalty=0.5, penalty_scope="prompt_and_output"),
        SamplingParams(temperature=0, allowed_token_ids=[4, 8, 15, 16, 23, 42]),
        SamplingParams(top_k=5, exponential_decay_length_penalty=(1, 1.2)),
    ],
    "mixed": [
        SamplingParams(temperature=0),
        SamplingParams(seed=3, top_k=8, top_p=0.9, min_p=0.02, repetition_penalty=1.3),
        SamplingParams(top_p=0.7, frequency_penalty=0.4, min_new_tokens=10, logprobs=3),
    ],
}


@dataclass
class Request:
    """A `SamplingRequest`: a prompt, a few generated tokens, maybe a seeded generator."""

    sampling_params: SamplingParams
    token_ids: list[int] = field(default_factory=lambda: [1, 5, 9, 5, 1200, 7, 7, 3])
    num_prompt_tokens: int = 5
    eos_token_ids: frozenset[int] = frozenset({2})
    generator: torch.Generator | None = None


def make_requests(case: str, device: torch.device) -> list[Request]:
    requests = []
    for params in CASES[case]:
        resolved = params.with_model_defaults({})
        resolved.validate()
        requests.append(Request(resolved, generator=seeded_generator(resolved.seed, device)))
    return requests


def sampling_step(requests: list[Request], logits: torch.Tensor, sampler: Sampler) -> SamplerOutput:
    """What the runner does every step before reading the results back."""
    batch = SamplingBatch.from_requests(requests, logits.device)
    return sampler(logits, batch)


class ForbidHostReads(TorchDispatchMode):
    """Raises on operators that read tensor data back to the host or whose output shape
    depends on the data (on a GPU each is a device->host sync)."""

    FORBIDDEN = frozenset(
        {
            aten._local_scalar_dense.default,  # .item(), bool(), int(), float()
            aten.is_nonzero.default,
            aten.equal.default,
            aten.allclose.default,
            aten.nonzero.default,
            aten.nonzero_static.default,
            aten.masked_select.default,
            aten.unique_consecutive.default,
            aten._unique2.default,
            aten.repeat_interleave.Tensor,
        }
    )
    INDEXING = frozenset({aten.index.Tensor, aten.index_put.default, aten.index_put_.default})

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        if func in self.FORBIDDEN:
            raise AssertionError(f"{func} reads device data on the host")
        if func in self.INDEXING and any(
            index is not None and index.dtype in (torch.bool, torch.uint8) for index in args[1]
        ):
            raise AssertionError(f"{func} with a boolean mask has a data-dependent shape")
        return func(*args, **(kwargs or {}))


@contextmanager
def no_host_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def forbidden(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a tensor was read back to the host")

    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "tolist", forbidden)
        patch.setattr(torch.Tensor, "numpy", forbidden)
        with ForbidHostReads():
            yield


def test_the_guard_catches_host_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.tensor([1.0, 0.0, 2.0])
    for read in (
        lambda: x.sum().item(),
        lambda: bool(x.any()),
        lambda: x.tolist(),
        lambda: x[x > 0],
        lambda: torch.nonzero(x),
    ):
        with no_host_reads(monkeypatch), pytest.raises(AssertionError):
            read()


@pytest.mark.parametrize("case", sorted(CASES))
def test_no_host_reads_on_cpu(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    requests = make_requests(case, cpu)
    logits = torch.randn(len(requests), VOCAB, generator=torch.Generator().manual_seed(0))
    sampler = Sampler(torch.Generator().manual_seed(1))
    with no_host_reads(monkeypatch):
        output = sampling_step(requests, logits, sampler)
    assert output.token_ids.shape == (len(requests),)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="sync debug mode needs CUDA")
@pytest.mark.parametrize("case", sorted(CASES))
def test_no_synchronizing_call_on_cuda(case: str) -> None:
    device = torch.device("cuda")
    requests = make_requests(case, device)
    logits = torch.randn(len(requests), 151_655, device=device)
    generator = torch.Generator(device=device)
    generator.manual_seed(1)
    sampler = Sampler(generator)
    # The first step may initialize libraries and the pinned-memory pool; a server is warm.
    sampling_step(requests, logits, sampler)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            output = sampling_step(requests, logits, sampler)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert output.token_ids.shape == (len(requests),)
    assert output.token_ids.is_cuda
