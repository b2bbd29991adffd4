"""Architecture name (config.architectures[0]) -> Ocula model class, imported on first use."""

from __future__ import annotations

import importlib

from torch import nn
from transformers import PretrainedConfig

TEXT_MODELS: dict[str, str] = {
    "LlamaForCausalLM": "ocula.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "ocula.models.llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "ocula.models.llama:LlamaForCausalLM",
    "InternLM2ForCausalLM": "ocula.models.internlm2:InternLM2ForCausalLM",
}
# Vision-language models; their configs come from `internvl_config.load_vlm_config`.
MULTIMODAL_MODELS: dict[str, str] = {
    "InternVLChatModel": "ocula.models.internvl:InternVLChatModel",
    "InternVLForConditionalGeneration": "ocula.models.internvl:InternVLChatModel",
}
_ALL_MODELS = {**TEXT_MODELS, **MULTIMODAL_MODELS}


def supported_architectures() -> list[str]:
    return sorted(_ALL_MODELS)


def resolve_model_class(config: PretrainedConfig) -> type[nn.Module]:
    """The class that implements the first architecture in `config.architectures` we support."""
    module_name, class_name = _ALL_MODELS[supported_architecture(config)].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def supported_architecture(config: PretrainedConfig) -> str:
    """The first architecture in `config.architectures` we support, without importing its
    model (checked as the config is read, before anything reads the shapes of a model we may
    not have). Raises ValueError naming the supported ones."""
    architectures = list(getattr(config, "architectures", None) or [])
    for name in architectures:
        if name in _ALL_MODELS:
            return name
    raise ValueError(
        f"unsupported model architecture {architectures or '(none in config.json)'}; "
        f"supported: {', '.join(supported_architectures())}"
    )
