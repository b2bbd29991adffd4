"""A tiny model's forward with the fused kernels switched on equals the torch path.

Each layer asks `use_triton(tensor)` in its own module; the tests patch that answer per kernel,
so the Triton path runs on CPU too (in the interpreter) and the torch path can run on CUDA.
Three steps go through a real KV pool: a prefill of two sequences with spliced image rows, then
a mixed step (two decodes and a new prefill), so the stored K/V are read back by attention.

Bit-identical: RoPE (which, switched on, also stores the layer's K/V in the same launch), the KV
store and the splice everywhere, SiLU-and-mul on CUDA (on CPU the interpreter's numpy exp is not
torch's). With every kernel on, RMSNorm's float32 sum of squares is summed in the kernel's own
order (see ocula/kernels/rmsnorm.py), so that check allows the rounding-level differences such an
order change makes in float32.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ocula.models.hf_config import load_text_config
from ocula.models.loader import load_model
from tests.helpers.forward import PagedRunner

# kernel -> module whose `use_triton` decides whether it runs
KERNEL_SWITCHES = {
    "rms_norm": "ocula.layers.norm",
    "rotary": "ocula.layers.rotary",
    "silu_and_mul": "ocula.layers.activation",
    "kv_store": "ocula.engine.kv_pool",
    "splice": "ocula.models.decoder_blocks",
}
# Batching's tolerance (tests/models/test_batching.py): float32 rounding, nothing more.
FLOAT32_ROUNDING = {"atol": 1e-5, "rtol": 1e-5}


def exact_kernels(device: torch.device) -> set[str]:
    return {"rotary", "kv_store", "splice"} | ({"silu_and_mul"} if device.type == "cuda" else set())


def switch_kernels(monkeypatch: pytest.MonkeyPatch, enabled: set[str]) -> None:
    for kernel, module in KERNEL_SWITCHES.items():
        on = kernel in enabled
        monkeypatch.setattr(f"{module}.use_triton", lambda tensor, on=on: on)


@torch.no_grad()
def run_steps(
    model: torch.nn.Module, dtype: torch.dtype, device: torch.device
) -> tuple[list[torch.Tensor], PagedRunner]:
    """Hidden states of three steps (see the module docstring) and the runner holding the pool."""
    runner = PagedRunner(model, max_seqs=4, max_len=32, dtype=dtype, device=device)
    hidden_size = model.model.norm.weight.shape[0]
    steps = [
        [(0, [5, 17, 99, 3, 250, 41, 8]), (1, [77, 12, 600, 4, 9])],
        [(1, [31]), (2, [2, 3, 5, 7, 11, 13]), (0, [400])],
        [(2, [60]), (0, [61]), (1, [62])],
    ]
    outputs = []
    for i, chunks in enumerate(steps):
        batch = runner.build_batch(chunks, all_logits=True)
        if i == 0:
            generator = torch.Generator().manual_seed(0)
            batch.spliced_rows = torch.tensor([9, 1, 3], device=device)
            # float32 embeddings, as a vision tower may hand them over: converted on the splice.
            batch.spliced_embeds = torch.randn(3, hidden_size, generator=generator).to(device)
        outputs.append(model(batch).clone())
        for row, token_ids in chunks:
            runner.lengths[row] += len(token_ids)
    return outputs, runner


def load_tiny(tiny_checkpoint: Any, arch: str, dtype: torch.dtype, device: torch.device) -> Any:
    checkpoint = tiny_checkpoint(arch)
    return load_model(checkpoint, load_text_config(checkpoint), dtype, device)


@pytest.mark.parametrize("arch", ["llama", "internlm2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_exact_kernels_give_bit_identical_hidden_states(
    tiny_checkpoint: Any,
    device: torch.device,
    monkeypatch: pytest.MonkeyPatch,
    arch: str,
    dtype: torch.dtype,
) -> None:
    if dtype == torch.bfloat16 and device.type != "cuda":
        pytest.skip("bf16 runs on CUDA only (the interpreter computes bf16 wrongly)")
    model = load_tiny(tiny_checkpoint, arch, dtype, device)
    switch_kernels(monkeypatch, set())
    expected, torch_runner = run_steps(model, dtype, device)
    switch_kernels(monkeypatch, exact_kernels(device))
    got, kernel_runner = run_steps(model, dtype, device)
    for step, (out, ref) in enumerate(zip(got, expected, strict=True)):
        assert torch.equal(out, ref), f"step {step}"
    for layer in range(len(torch_runner.pool.k_caches)):
        assert torch.equal(kernel_runner.pool.k_caches[layer], torch_runner.pool.k_caches[layer])
        assert torch.equal(kernel_runner.pool.v_caches[layer], torch_runner.pool.v_caches[layer])


def test_all_kernels_match_the_torch_path(
    tiny_checkpoint: Any, device: torch.device, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = load_tiny(tiny_checkpoint, "llama", torch.float32, device)
    switch_kernels(monkeypatch, set())
    expected, _ = run_steps(model, torch.float32, device)
    switch_kernels(monkeypatch, set(KERNEL_SWITCHES))
    got, _ = run_steps(model, torch.float32, device)
    for out, ref in zip(got, expected, strict=True):
        torch.testing.assert_close(out, ref, **FLOAT32_ROUNDING)
