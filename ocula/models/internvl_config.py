"""InternVL configs in both checkpoint layouts, normalised into one plain description.

- Original OpenGVLab layout (`architectures: ["InternVLChatModel"]`): `llm_config` (a text model's
  config.json as a dict, read through the same path as text models: InternLM2 becomes the
  equivalent LlamaConfig), `vision_config` (InternViT: `qkv_bias`, `qk_normalization`,
  `norm_type`, ...), `select_layer`, `downsample_ratio`, `ps_version`, `force_image_size`, tiling
  settings and `template`. Keys the file leaves out take the original config classes' defaults.
- HF layout (`InternVLForConditionalGeneration`): transformers' InternVLConfig; the tiling settings
  live in preprocessor_config.json (`max_patches`, `min_patches`, `crop_to_patches`). transformers
  always uses the "v2" pixel shuffle and ties the LM head to the embedding according to the
  top-level `tie_word_embeddings`.

`InternVLModelConfig` is what the engine gets as its model config: `architectures` drives the
model registry, `vocab_size` / `eos_token_id` / `dtype` are the language model's.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from ocula.models.hf_config import internlm2_config

ORIGINAL_ARCHITECTURE = "InternVLChatModel"
HF_ARCHITECTURE = "InternVLForConditionalGeneration"
VLM_ARCHITECTURES = frozenset({ORIGINAL_ARCHITECTURE, HF_ARCHITECTURE})

# The prompt strings of InternVL: each image is `<img>` + n x `<IMG_CONTEXT>` + `</img>`.
IMAGE_START_TOKEN = "<img>"
IMAGE_END_TOKEN = "</img>"
IMAGE_CONTEXT_TOKEN = "<IMG_CONTEXT>"

# Defaults of the original InternVisionConfig / InternVLChatConfig for keys a config.json omits.
_ORIGINAL_VISION_DEFAULTS: dict[str, Any] = {
    "num_channels": 3,
    "patch_size": 14,
    "image_size": 224,
    "qkv_bias": False,
    "hidden_size": 3200,
    "num_attention_heads": 25,
    "intermediate_size": 12800,
    "qk_normalization": True,
    "num_hidden_layers": 48,
    "hidden_act": "gelu",
    "norm_type": "rms_norm",
    "layer_norm_eps": 1e-6,
}
_HF_QK_NORM_EPS = 1e-6  # transformers' InternVL vision attention builds its q/k RMSNorm with it
_HF_DEFAULT_MAX_PATCHES = 12
# HF-layout text configs may name no architecture; their model_type decides the decoder.
_CAUSAL_LM_OF_MODEL_TYPE = {
    "qwen2": "Qwen2ForCausalLM",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
}


@dataclass(frozen=True)
class InternViTConfig:
    """InternViT hyper-parameters, layout-independent."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int  # the size the position embeddings were trained for
    patch_size: int
    num_channels: int = 3
    qkv_bias: bool = False
    qk_normalization: bool = False  # RMSNorm of q and k over all heads' channels
    qk_norm_eps: float = 1e-6
    norm_type: str = "layer_norm"  # "layer_norm" | "rms_norm"
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"
    final_layernorm: bool = False  # HF `use_mean_pooling=False`: a LayerNorm after the last layer


@dataclass
class InternVLModelConfig:
    """The engine's model config for an InternVL checkpoint (see the module docstring)."""

    architectures: list[str]
    layout: str  # "original" | "hf": which checkpoint names `load_weights` expects
    text_config: PretrainedConfig
    vision_config: InternViTConfig
    select_layer: int  # which ViT hidden state feeds the projector; -1 = the last layer
    downsample_ratio: float
    ps_version: str  # "v1" | "v2" pixel shuffle
    image_size: int  # side of one tile in pixels
    projector_hidden_act: str = "gelu"
    image_token_id: int | None = None  # HF layout only; else `image_token_id_for(tokenizer)`
    dynamic_image_size: bool = True
    use_thumbnail: bool = True
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = _HF_DEFAULT_MAX_PATCHES
    template: str | None = None
    dtype: Any = None
    image_start_token: str = IMAGE_START_TOKEN
    image_end_token: str = IMAGE_END_TOKEN
    image_context_token: str = IMAGE_CONTEXT_TOKEN

    @property
    def vocab_size(self) -> int:
        return int(self.text_config.vocab_size)

    @property
    def eos_token_id(self) -> int | list[int] | None:
        return getattr(self.text_config, "eos_token_id", None)

    @property
    def patch_size(self) -> int:
        return self.vision_config.patch_size

    @property
    def tokens_per_tile(self) -> int:
        """LLM tokens per image tile: (image_size / patch)^2 * downsample_ratio^2."""
        side = self.image_size // self.patch_size
        return round(side * side * self.downsample_ratio * self.downsample_ratio)

    def image_token_id_for(self, tokenizer: Any) -> int:
        """The IMG_CONTEXT id: the config's (HF layout), else the tokenizer's."""
        if self.image_token_id is not None:
            return self.image_token_id
        token_id = tokenizer.convert_tokens_to_ids(self.image_context_token)
        if token_id is None or token_id == getattr(tokenizer, "unk_token_id", None):
            raise ValueError(f"the tokenizer has no {self.image_context_token} token")
        return int(token_id)


def is_vlm_config(raw: dict[str, Any]) -> bool:
    """Whether a config.json (as a dict) describes an InternVL checkpoint of either layout."""
    return bool(VLM_ARCHITECTURES.intersection(raw.get("architectures") or []))


def text_config_from_dict(raw: dict[str, Any]) -> PretrainedConfig:
    """An embedded text config (`llm_config`) -> a config the text model classes accept."""
    if raw.get("model_type") == "internlm2":
        return internlm2_config(raw)
    if "model_type" not in raw:
        raise ValueError("llm_config has no model_type")
    settings = {key: value for key, value in raw.items() if key != "model_type"}
    return AutoConfig.for_model(raw["model_type"], **settings)


def _square(value: Any, what: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"only square {what}s are supported, the config has {value}")
        value = value[0]
    return int(value)


def _original_config(raw: dict[str, Any]) -> InternVLModelConfig:
    vision = {**_ORIGINAL_VISION_DEFAULTS, **raw.get("vision_config", {})}
    text = text_config_from_dict(raw["llm_config"])
    vit = InternViTConfig(
        hidden_size=vision["hidden_size"],
        intermediate_size=vision["intermediate_size"],
        num_hidden_layers=vision["num_hidden_layers"],
        num_attention_heads=vision["num_attention_heads"],
        image_size=_square(vision["image_size"], "image"),
        patch_size=_square(vision["patch_size"], "patch"),
        num_channels=vision["num_channels"],
        qkv_bias=bool(vision["qkv_bias"]),
        qk_normalization=bool(vision["qk_normalization"]),
        qk_norm_eps=float(vision["layer_norm_eps"]),
        norm_type=vision["norm_type"],
        layer_norm_eps=float(vision["layer_norm_eps"]),
        hidden_act=vision["hidden_act"],
    )
    dtype = raw.get("torch_dtype", raw.get("dtype")) or getattr(text, "dtype", None)
    return InternVLModelConfig(
        architectures=[ORIGINAL_ARCHITECTURE],
        layout="original",
        text_config=text,
        vision_config=vit,
        select_layer=int(raw.get("select_layer", -1)),
        downsample_ratio=float(raw.get("downsample_ratio", 0.5)),
        ps_version=raw.get("ps_version", "v1"),
        image_size=int(raw.get("force_image_size") or vit.image_size),
        dynamic_image_size=bool(raw.get("dynamic_image_size", False)),
        use_thumbnail=bool(raw.get("use_thumbnail", False)),
        min_dynamic_patch=int(raw.get("min_dynamic_patch", 1)),
        max_dynamic_patch=int(raw.get("max_dynamic_patch", 6)),
        template=raw.get("template"),
        dtype=dtype,
    )


def _hf_config(model_dir: Path) -> InternVLModelConfig:
    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    vision = config.vision_config
    if getattr(vision, "use_absolute_position_embeddings", True) is not True:
        raise ValueError("InternViT without absolute position embeddings is not supported")
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    if strategy != "default":
        raise ValueError(f"vision_feature_select_strategy {strategy!r} is not supported")
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"a list of vision_feature_layer ({layer}) is not supported")
    vit = InternViTConfig(
        hidden_size=vision.hidden_size,
        intermediate_size=vision.intermediate_size,
        num_hidden_layers=vision.num_hidden_layers,
        num_attention_heads=vision.num_attention_heads,
        image_size=_square(vision.image_size, "image"),
        patch_size=_square(vision.patch_size, "patch"),
        num_channels=vision.num_channels,
        qkv_bias=bool(vision.attention_bias),
        qk_normalization=bool(vision.use_qk_norm),
        qk_norm_eps=_HF_QK_NORM_EPS,
        norm_type=vision.norm_type,
        layer_norm_eps=float(vision.layer_norm_eps),
        hidden_act=vision.hidden_act,
        final_layernorm=not vision.use_mean_pooling,
    )
    # The top-level flag decides tying in transformers; the text model must agree with it.
    text = copy.deepcopy(config.text_config)
    text.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
    if not getattr(text, "architectures", None):
        if text.model_type not in _CAUSAL_LM_OF_MODEL_TYPE:
            raise ValueError(f"InternVL with a {text.model_type!r} language model is not supported")
        text.architectures = [_CAUSAL_LM_OF_MODEL_TYPE[text.model_type]]
    processor_path = model_dir / "preprocessor_config.json"
    processor = json.loads(processor_path.read_text()) if processor_path.is_file() else {}
    return InternVLModelConfig(
        architectures=[HF_ARCHITECTURE],
        layout="hf",
        text_config=text,
        vision_config=vit,
        select_layer=layer,
        downsample_ratio=float(config.downsample_ratio),
        ps_version="v2",
        image_size=vit.image_size,
        projector_hidden_act=config.projector_hidden_act,
        image_token_id=int(config.image_token_id),
        dynamic_image_size=bool(processor.get("crop_to_patches", True)),
        use_thumbnail=bool(processor.get("crop_to_patches", True)),
        min_dynamic_patch=int(processor.get("min_patches", 1)),
        max_dynamic_patch=int(processor.get("max_patches", _HF_DEFAULT_MAX_PATCHES)),
        dtype=getattr(config, "dtype", None) or getattr(text, "dtype", None),
    )


def load_vlm_config(model_dir: str | Path) -> InternVLModelConfig:
    """The normalised config of the InternVL checkpoint in `model_dir` (either layout)."""
    model_dir = Path(model_dir)
    raw = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    architectures = raw.get("architectures") or []
    if ORIGINAL_ARCHITECTURE in architectures:
        return _original_config(raw)
    if HF_ARCHITECTURE in architectures:
        return _hf_config(model_dir)
    raise ValueError(f"{model_dir} is not an InternVL checkpoint (architectures {architectures})")
