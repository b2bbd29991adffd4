"""Tiny random InternVL checkpoints in both layouts, built from transformers' own model.

- `make_hf_internvl(out_dir, text_arch, **vision_overrides)`: a transformers
  `InternVLForConditionalGeneration` (InternViT hidden 32, 2 layers, 2 heads, 56 px tiles of 14 px
  patches: a 4 x 4 grid, 4 tokens per tile after the pixel shuffle; text model of tiny_models'
  sizes) saved with `save_pretrained`, plus the test tokenizer with `<img>`, `</img>` and
  `<IMG_CONTEXT>` added. `text_arch` "qwen2" or "llama" (the weights an InternLM2 holds);
  `vision_overrides` go into InternVLVisionConfig (e.g. `use_qk_norm=True`).
- `write_original_layout(hf_dir, out_dir, text_arch)`: the same weights under the original
  OpenGVLab names and config (`InternVLChatModel`); "internlm2" packs the Llama q/k/v into `wqkv`.
- `load_hf_reference(hf_dir)`: the transformers model both checkpoints must compute exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import (
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from tests.helpers.tiny_models import (
    TINY_SIZES,
    _internlm2_names,
    _internlm2_raw_config,
    _randomize,
    make_tokenizer,
)

IMAGE_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>"]
VISION_SIZES: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 56,
    "patch_size": 14,
    "layer_norm_eps": 1e-6,
    "attention_bias": True,  # InternViT-300M style; the 6B style has no qkv bias
}
TOKENS_PER_TILE = 4  # (56 / 14)^2 * 0.5^2


def make_vlm_tokenizer(out_dir: Path) -> PreTrainedTokenizerFast:
    """The tiny test tokenizer plus InternVL's three image tokens, saved into `out_dir`."""
    tokenizer = make_tokenizer(out_dir)
    tokenizer.add_tokens(IMAGE_TOKENS, special_tokens=True)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def make_hf_internvl(
    out_dir: str | Path,
    text_arch: str = "qwen2",
    seed: int = 0,
    vision_feature_layer: int = -1,
    **vision_overrides: Any,
) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = make_vlm_tokenizer(out_dir)
    text_settings = {
        **TINY_SIZES,
        "vocab_size": len(tokenizer),
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }
    if text_arch == "qwen2":
        text_config: Any = Qwen2Config(**text_settings)
    elif text_arch == "llama":
        text_config = LlamaConfig(**text_settings, attention_bias=False, mlp_bias=False)
    else:
        raise ValueError(f"unknown text_arch {text_arch!r}")
    config = InternVLConfig(
        vision_config=InternVLVisionConfig(**{**VISION_SIZES, **vision_overrides}),
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=TOKENS_PER_TILE,
        downsample_ratio=0.5,
        vision_feature_layer=vision_feature_layer,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    _randomize(model, seed)
    model.save_pretrained(str(out_dir))
    return out_dir


def load_hf_reference(hf_dir: Path) -> InternVLForConditionalGeneration:
    model = InternVLForConditionalGeneration.from_pretrained(str(hf_dir), dtype=torch.float32)
    return model.eval()


# HF vision tower / projector name -> original name (whole dotted components).
_HF_TO_ORIGINAL = (
    ("model.vision_tower.", "vision_model."),
    ("model.multi_modal_projector.layer_norm.", "mlp1.0."),
    ("model.multi_modal_projector.linear_1.", "mlp1.1."),
    ("model.multi_modal_projector.linear_2.", "mlp1.3."),
    (".patch_embeddings.projection.", ".patch_embedding."),
    (".cls_token", ".class_embedding"),
    (".position_embeddings", ".position_embedding"),
    (".encoder.layer.", ".encoder.layers."),
    (".attention.projection_layer.", ".attn.proj."),
    (".attention.q_norm.", ".attn.q_norm."),
    (".attention.k_norm.", ".attn.k_norm."),
    (".layernorm_before.", ".norm1."),
    (".layernorm_after.", ".norm2."),
    (".lambda_1", ".ls1"),
    (".lambda_2", ".ls2"),
)


def _original_vision_state(hf_state: dict[str, torch.Tensor], num_layers: int) -> dict:
    out = {}
    for name, tensor in hf_state.items():
        if name.startswith("model.language_model.") or name == "lm_head.weight":
            continue
        if ".attention.q_proj." in name or ".attention.k_proj." in name:
            continue
        if ".attention.v_proj." in name:
            continue
        for old, new in _HF_TO_ORIGINAL:
            name = name.replace(old, new)
        out[name] = tensor
    for layer in range(num_layers):
        hf_prefix = f"model.vision_tower.encoder.layer.{layer}.attention."
        for kind in ("weight", "bias"):
            if f"{hf_prefix}q_proj.{kind}" in hf_state:
                stacked = [hf_state[f"{hf_prefix}{p}_proj.{kind}"] for p in "qkv"]
                out[f"vision_model.encoder.layers.{layer}.attn.qkv.{kind}"] = torch.cat(stacked)
    return out


def _original_vision_config(vision: dict[str, Any]) -> dict[str, Any]:
    return {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        "hidden_size": vision["hidden_size"],
        "intermediate_size": vision["intermediate_size"],
        "num_hidden_layers": vision["num_hidden_layers"],
        "num_attention_heads": vision["num_attention_heads"],
        "image_size": vision["image_size"][0],
        "patch_size": vision["patch_size"][0],
        "num_channels": 3,
        "qkv_bias": vision["attention_bias"],
        "qk_normalization": vision["use_qk_norm"],
        "norm_type": vision["norm_type"],
        "layer_norm_eps": vision["layer_norm_eps"],
        "hidden_act": vision["hidden_act"],
        "use_flash_attn": False,
    }


def write_original_layout(
    hf_dir: Path, out_dir: str | Path, text_arch: str, ps_version: str = "v2"
) -> Path:
    """The checkpoint in `hf_dir` under original names; `text_arch` "qwen2" or "internlm2"
    (which needs an `hf_dir` built with text_arch "llama")."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = make_vlm_tokenizer(out_dir)
    hf_raw = json.loads((hf_dir / "config.json").read_text())
    # transformers' module names (its files hold legacy Llava-style prefixes).
    hf_state = {k: v.detach().clone() for k, v in load_hf_reference(hf_dir).state_dict().items()}
    vision = hf_raw["vision_config"]
    state = _original_vision_state(hf_state, vision["num_hidden_layers"])
    language = {
        name.replace("model.language_model.", "model."): tensor
        for name, tensor in hf_state.items()
        if name.startswith("model.language_model.") or name == "lm_head.weight"
    }
    if text_arch == "internlm2":
        llm_config = _internlm2_raw_config(len(tokenizer), {})
        language = _internlm2_names(language, LlamaConfig(**TINY_SIZES))
    elif text_arch == "qwen2":
        llm_config = {**hf_raw["text_config"], "architectures": ["Qwen2ForCausalLM"]}
    else:
        raise ValueError(f"unknown text_arch {text_arch!r}")
    state.update({f"language_model.{name}": tensor for name, tensor in language.items()})
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / "model.safetensors"))
    raw = {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "llm_config": llm_config,
        "vision_config": _original_vision_config(vision),
        "downsample_ratio": hf_raw["downsample_ratio"],
        "ps_version": ps_version,
        "select_layer": hf_raw["vision_feature_layer"],
        "force_image_size": vision["image_size"][0],
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "max_dynamic_patch": 12,
        "min_dynamic_patch": 1,
        "template": "internvl2_5",
        "torch_dtype": "float32",
    }
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2))
    return out_dir
