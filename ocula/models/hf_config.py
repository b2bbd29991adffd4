"""Reading a checkpoint's text-model config without running code shipped with the checkpoint.

Model types transformers knows go through AutoConfig. InternLM2 ships its config class as remote
code; its config.json is plain data, so it is translated here into a LlamaConfig (the same decoder
hyper-parameters) whose `architectures` still names `InternLM2ForCausalLM`, which is what the
model registry dispatches on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, LlamaConfig, PretrainedConfig

# InternLM2 config.json keys carried over unchanged into the LlamaConfig.
_INTERNLM2_PLAIN_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "initializer_range",
)
_INTERNLM2_DEFAULT_ROPE_THETA = 10000.0


def _read_json(path: Path) -> dict[str, Any]:
    """The file's JSON object; ValueError naming the file when it is not one."""
    try:
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def internlm2_rope_parameters(raw: dict[str, Any]) -> dict[str, Any]:
    """InternLM2's `rope_theta` + `rope_scaling: {"type", "factor"}` as transformers 5 `rope_parameters`."""
    theta = float(raw.get("rope_theta", _INTERNLM2_DEFAULT_ROPE_THETA))
    scaling = raw.get("rope_scaling")
    if not scaling:
        return {"rope_type": "default", "rope_theta": theta}
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type not in ("linear", "dynamic"):
        raise ValueError(
            f"InternLM2 rope_scaling type {rope_type!r} is not supported (linear, dynamic)"
        )
    return {"rope_type": rope_type, "factor": float(scaling["factor"]), "rope_theta": theta}


def internlm2_config(raw: dict[str, Any]) -> PretrainedConfig:
    """An InternLM2 config.json (as a dict) -> an equivalent LlamaConfig."""
    kwargs = {key: raw[key] for key in _INTERNLM2_PLAIN_KEYS if key in raw}
    bias = bool(raw.get("bias", False))
    dtype = raw.get("torch_dtype", raw.get("dtype"))
    config = LlamaConfig(
        **kwargs,
        rope_parameters=internlm2_rope_parameters(raw),
        attention_bias=bias,  # InternLM2's `bias` covers wqkv and wo only
        mlp_bias=False,
        architectures=list(raw.get("architectures") or ["InternLM2ForCausalLM"]),
        **({"dtype": dtype} if dtype else {}),
    )
    config.source_model_type = "internlm2"
    return config


def load_text_config(model_dir: str | Path) -> PretrainedConfig:
    """The language-model config of the checkpoint in `model_dir`.

    For an InternVL checkpoint (either layout): its `InternVLModelConfig`, which the registry
    resolves to the vision-language model and whose `text_config` is the language model's.
    """
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {model_dir}")
    raw = _read_json(path)
    from ocula.models import internvl_config  # imported here: it imports this module

    if internvl_config.is_vlm_config(raw):
        return internvl_config.load_vlm_config(model_dir)
    if raw.get("model_type") == "internlm2":
        return internlm2_config(raw)
    return AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)


_DTYPE_NAMES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}


def torch_dtype_of(config: PretrainedConfig) -> torch.dtype:
    """The dtype the checkpoint declares (`dtype`, or the older `torch_dtype`); float32 if none."""
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if declared is None:
        return torch.float32
    if isinstance(declared, torch.dtype):
        return declared
    name = str(declared).removeprefix("torch.")
    if name not in _DTYPE_NAMES:
        raise ValueError(f"config declares an unknown dtype {declared!r}")
    return _DTYPE_NAMES[name]
