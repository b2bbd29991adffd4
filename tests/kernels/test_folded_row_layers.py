"""Batch-1 steps with the RMSNorms folded into the GEMVs (`ocula.models.folded_row`), end to end
against transformers' greedy tokens.

On a GPU this is the decode path itself. On CPU the GEMVs run in Triton's interpreter: the test
lets `ocula.layers.linear` take CPU tensors as kernel tensors, so one-row projections (and with
them the folded layers) go to the kernels while the norms and attention keep their torch paths.
"""

from __future__ import annotations

import pytest
import torch

from ocula import LLM, SamplingParams
from ocula.layers import linear as linear_module
from ocula.models import decoder_blocks, folded_row
from tests.engine.conftest import PROMPTS, reference_continuations

GREEDY = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)


@pytest.fixture
def folded_steps(monkeypatch: pytest.MonkeyPatch, device: torch.device) -> list[int]:
    """Counts folded layer steps; on CPU, routes one-row projections to the interpreted GEMV."""
    if device.type == "cpu":
        monkeypatch.setattr(linear_module, "use_triton", lambda tensor: True)
    calls: list[int] = []
    real_step = decoder_blocks.folded_row_step

    def counting_step(*args, **kwargs):
        calls.append(1)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(decoder_blocks, "folded_row_step", counting_step)
    return calls


@pytest.mark.parametrize("arch", ["llama", "qwen2", "internlm2"])
def test_one_by_one_decoding_with_folded_norms_equals_transformers(
    tiny_checkpoint, device: torch.device, folded_steps: list[int], arch: str
) -> None:
    checkpoint = tiny_checkpoint(arch)
    # One prompt under the interpreter (~7 s a prompt on the 2-core CI machine), two on a GPU.
    prompts = PROMPTS[:1] if device.type == "cpu" else PROMPTS[:2]
    expected = reference_continuations(checkpoint, prompts, GREEDY.max_new_tokens)
    llm = LLM(str(checkpoint), device=device.type, data_type="fp32", max_total_token_num=1024)
    got = [llm.generate(prompt, GREEDY)[0].token_ids for prompt in prompts]
    assert got == expected
    layers = 2  # the tiny checkpoints' depth
    if device.type == "cpu":  # every decode step runs eagerly
        assert len(folded_steps) >= len(prompts) * (GREEDY.max_new_tokens - 1) * layers
    else:  # the batch-1 decode graph was captured through the folded layers, then replayed
        assert len(folded_steps) >= layers


def test_the_unfolded_path_is_kept_when_folding_is_off(
    tiny_checkpoint, device: torch.device, folded_steps: list[int], monkeypatch
) -> None:
    monkeypatch.setattr(folded_row, "FOLD_ROW_NORMS", False)
    checkpoint = tiny_checkpoint("qwen2")
    expected = reference_continuations(checkpoint, PROMPTS[:1], GREEDY.max_new_tokens)
    llm = LLM(str(checkpoint), device=device.type, data_type="fp32", max_total_token_num=1024)
    assert llm.generate(PROMPTS[0], GREEDY)[0].token_ids == expected[0]
    assert folded_steps == []


def test_a_layer_that_cannot_fold_takes_the_stream_unfolded(
    tiny_checkpoint, device: torch.device, folded_steps: list[int], monkeypatch
) -> None:
    """Folded and unfolded layers mixed in one step (every second layer refuses to fold): the
    stream a folded layer hands on is taken as an unfused layer's input, tokens unchanged."""
    real = decoder_blocks.folds_row_norms
    asked: list[int] = []

    def every_other_layer(*args, **kwargs) -> bool:
        asked.append(1)
        return len(asked) % 2 == 1 and real(*args, **kwargs)

    monkeypatch.setattr(decoder_blocks, "folds_row_norms", every_other_layer)
    checkpoint = tiny_checkpoint("llama")
    expected = reference_continuations(checkpoint, PROMPTS[:1], GREEDY.max_new_tokens)
    llm = LLM(str(checkpoint), device=device.type, data_type="fp32", max_total_token_num=1024)
    assert llm.generate(PROMPTS[0], GREEDY)[0].token_ids == expected[0]
    assert folded_steps  # some layers did fold
