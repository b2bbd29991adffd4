"""Checkpoint loading: sharded files in parallel, configs, and clear errors on mismatches."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from ocula.models.hf_config import load_text_config, torch_dtype_of
from ocula.models.loader import checkpoint_files, load_model
from ocula.models.registry import resolve_model_class
from ocula.models.weight_routing import CheckpointMismatchError
from tests.models.conftest import load_ocula


def assert_same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> None:
    a_params, b_params = dict(a.named_parameters()), dict(b.named_parameters())
    assert a_params.keys() == b_params.keys()
    for name, param in a_params.items():
        assert torch.equal(param, b_params[name]), name


@pytest.mark.parametrize("arch", ["qwen2", "internlm2"])
def test_sharded_checkpoint_with_two_workers_loads_identically(
    tiny_checkpoint: Any, arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    single = tiny_checkpoint(arch)
    sharded = tiny_checkpoint(arch, num_shards=3)
    assert len(checkpoint_files(sharded)) == 3
    monkeypatch.setenv("LOADWORKER", "2")
    assert_same_parameters(load_ocula(sharded), load_ocula(single))


def test_unexpected_and_missing_weights_are_named(tiny_checkpoint: Any, tmp_path: Path) -> None:
    source = tiny_checkpoint("llama")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((source / name).read_bytes())
    tensors = load_file(str(source / "model.safetensors"))
    extra = {**tensors, "model.layers.0.self_attn.extra_proj.weight": torch.zeros(2, 2)}
    save_file(extra, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"extra_proj\.weight"):
        load_ocula(tmp_path)

    lacking = dict(tensors)
    del lacking["model.layers.1.self_attn.k_proj.weight"]
    del lacking["model.norm.weight"]
    save_file(lacking, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError) as error:
        load_ocula(tmp_path)
    assert "model.layers.1.self_attn.qkv_proj.weight [k]" in str(error.value)
    assert "model.norm.weight" in str(error.value)


def test_rotary_inv_freq_in_checkpoint_is_ignored(tiny_checkpoint: Any, tmp_path: Path) -> None:
    source = tiny_checkpoint("llama")
    (tmp_path / "config.json").write_bytes((source / "config.json").read_bytes())
    tensors = load_file(str(source / "model.safetensors"))
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    assert_same_parameters(load_ocula(tmp_path), load_ocula(source))


def test_model_is_built_in_the_requested_dtype(tiny_checkpoint: Any) -> None:
    checkpoint = tiny_checkpoint("llama")
    model = load_model(checkpoint, load_text_config(checkpoint), torch.bfloat16, "cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.rotary_emb.cos_cache.dtype == torch.float32
    assert torch.get_default_dtype() == torch.float32
    assert model.max_context_len() == 512  # max_position_embeddings of the tiny configs


def test_internlm2_config_is_translated_without_remote_code(tiny_checkpoint: Any) -> None:
    checkpoint = tiny_checkpoint(
        "internlm2", bias=True, rope_theta=1000000, rope_scaling={"type": "dynamic", "factor": 2.0}
    )
    config = load_text_config(checkpoint)
    assert config.architectures == ["InternLM2ForCausalLM"]
    assert config.rope_parameters == {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}
    assert config.attention_bias and not config.mlp_bias
    assert config.num_key_value_heads == 2 and config.hidden_size == 64
    assert torch_dtype_of(config) == torch.float32
    assert resolve_model_class(config).__name__ == "InternLM2ForCausalLM"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_known_model_types_resolve(tiny_checkpoint: Any, arch: str) -> None:
    config = load_text_config(tiny_checkpoint(arch))
    assert resolve_model_class(config).__name__ == "LlamaForCausalLM"


def test_unsupported_architecture_lists_supported(tiny_checkpoint: Any, tmp_path: Path) -> None:
    raw = json.loads((tiny_checkpoint("llama") / "config.json").read_text())
    raw["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(
        ValueError, match=r"GPT2LMHeadModel.*InternLM2ForCausalLM.*Qwen2ForCausalLM"
    ):
        resolve_model_class(load_text_config(tmp_path))


def test_torch_dtype_of_reads_names_and_defaults() -> None:
    from transformers import LlamaConfig

    assert torch_dtype_of(LlamaConfig(dtype="bfloat16")) == torch.bfloat16
    assert torch_dtype_of(LlamaConfig()) == torch.float32
