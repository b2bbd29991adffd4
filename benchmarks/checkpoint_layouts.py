"""The two checkpoint layouts the benchmarks write: configs and tensor names/shapes.

- transformers' layout (`InternVLForConditionalGeneration`, Qwen2 language model): the tensor
  list is read off transformers' own model built on the meta device, so it always matches the
  installed transformers;
- the original OpenGVLab layout (`InternVLChatModel`, InternLM2 language model with its packed
  `wqkv`): listed here by hand, as the original checkpoints name them.
"""

from __future__ import annotations

from typing import Any

import torch

from benchmarks.shapes import ModelSpec

LAYER_SCALE = 0.1
TensorSpec = tuple[str, tuple[int, ...]]


def qwen2_config(spec: ModelSpec, vocab: int, eos_id: int, bos_id: int) -> Any:
    from transformers import Qwen2Config

    text = spec.text
    return Qwen2Config(
        vocab_size=vocab,
        hidden_size=text.hidden,
        intermediate_size=text.intermediate,
        num_hidden_layers=text.layers,
        num_attention_heads=text.heads,
        num_key_value_heads=text.kv_heads,
        max_position_embeddings=text.max_positions,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": text.rope_theta},
        tie_word_embeddings=False,
        use_sliding_window=False,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        architectures=["Qwen2ForCausalLM"],
        dtype="bfloat16",
    )


def hf_internvl_config(spec: ModelSpec, tokenizer: Any) -> Any:
    from transformers import InternVLConfig, InternVLVisionConfig

    vision = spec.vision
    eos, bos = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    vision_config = InternVLVisionConfig(
        hidden_size=vision.hidden,
        intermediate_size=vision.intermediate,
        num_hidden_layers=vision.layers,
        num_attention_heads=vision.heads,
        image_size=[vision.image_size, vision.image_size],
        patch_size=[vision.patch_size, vision.patch_size],
        attention_bias=True,
        use_qk_norm=False,
        norm_type="layer_norm",
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        use_mean_pooling=True,
        layer_scale_init_value=LAYER_SCALE,
        dtype="bfloat16",
    )
    tokens_per_tile = round(
        (vision.image_size // vision.patch_size) ** 2 * vision.downsample_ratio**2
    )
    return InternVLConfig(
        vision_config=vision_config,
        text_config=qwen2_config(spec, len(tokenizer), eos, bos),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=tokens_per_tile,
        downsample_ratio=vision.downsample_ratio,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
        architectures=["InternVLForConditionalGeneration"],
        dtype="bfloat16",
    )


def hf_tensor_specs(config: Any) -> list[TensorSpec]:
    """Names and shapes of transformers' own model for `config` (built on the meta device)."""
    from transformers import InternVLForConditionalGeneration

    with torch.device("meta"):
        model = InternVLForConditionalGeneration(config)
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()]


def original_internvl_specs(spec: ModelSpec, vocab: int) -> list[TensorSpec]:
    """Tensor names of the original InternVL layout with an InternLM2 language model."""
    v, t = spec.vision, spec.text
    c, patches = v.hidden, (v.image_size // v.patch_size) ** 2
    shuffled = c * round(1 / v.downsample_ratio) ** 2
    specs: list[TensorSpec] = [
        ("vision_model.embeddings.class_embedding", (1, 1, c)),
        ("vision_model.embeddings.patch_embedding.weight", (c, 3, v.patch_size, v.patch_size)),
        ("vision_model.embeddings.patch_embedding.bias", (c,)),
        ("vision_model.embeddings.position_embedding", (1, patches + 1, c)),
    ]
    for i in range(v.layers):
        p = f"vision_model.encoder.layers.{i}."
        specs += [
            (p + n, (c,)) for n in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias")
        ]
        specs += [(p + "ls1", (c,)), (p + "ls2", (c,))]
        specs += [(p + "attn.qkv.weight", (3 * c, c)), (p + "attn.qkv.bias", (3 * c,))]
        specs += [(p + "attn.proj.weight", (c, c)), (p + "attn.proj.bias", (c,))]
        specs += [
            (p + "mlp.fc1.weight", (v.intermediate, c)),
            (p + "mlp.fc1.bias", (v.intermediate,)),
        ]
        specs += [(p + "mlp.fc2.weight", (c, v.intermediate)), (p + "mlp.fc2.bias", (c,))]
    h = t.hidden
    specs += [("mlp1.0.weight", (shuffled,)), ("mlp1.0.bias", (shuffled,))]
    specs += [("mlp1.1.weight", (h, shuffled)), ("mlp1.1.bias", (h,))]
    specs += [("mlp1.3.weight", (h, h)), ("mlp1.3.bias", (h,))]
    head_dim = h // t.heads
    lm = "language_model.model."
    specs.append((lm + "tok_embeddings.weight", (vocab, h)))
    for i in range(t.layers):
        p = f"{lm}layers.{i}."
        specs.append((p + "attention.wqkv.weight", ((t.heads + 2 * t.kv_heads) * head_dim, h)))
        specs.append((p + "attention.wo.weight", (h, t.heads * head_dim)))
        specs += [(p + f"feed_forward.{w}.weight", (t.intermediate, h)) for w in ("w1", "w3")]
        specs.append((p + "feed_forward.w2.weight", (h, t.intermediate)))
        specs += [(p + "attention_norm.weight", (h,)), (p + "ffn_norm.weight", (h,))]
    specs += [(lm + "norm.weight", (h,)), ("language_model.output.weight", (vocab, h))]
    return specs


def original_internvl_config(spec: ModelSpec, tokenizer: Any) -> dict[str, Any]:
    v, t = spec.vision, spec.text
    llm_config = {
        "architectures": ["InternLM2ForCausalLM"],
        "model_type": "internlm2",
        "vocab_size": len(tokenizer),
        "hidden_size": t.hidden,
        "intermediate_size": t.intermediate,
        "num_hidden_layers": t.layers,
        "num_attention_heads": t.heads,
        "num_key_value_heads": t.kv_heads,
        "max_position_embeddings": t.max_positions,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": t.rope_theta,
        "rope_scaling": None,
        "bias": False,
        "tie_word_embeddings": False,
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "torch_dtype": "bfloat16",
    }
    vision_config = {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        "hidden_size": v.hidden,
        "intermediate_size": v.intermediate,
        "num_hidden_layers": v.layers,
        "num_attention_heads": v.heads,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "num_channels": 3,
        "qkv_bias": True,
        "qk_normalization": False,
        "norm_type": "layer_norm",
        "layer_norm_eps": 1e-6,
        "hidden_act": "gelu",
        "use_flash_attn": False,
    }
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "llm_config": llm_config,
        "vision_config": vision_config,
        "downsample_ratio": v.downsample_ratio,
        "ps_version": "v2",
        "select_layer": -1,
        "force_image_size": v.image_size,
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "min_dynamic_patch": 1,
        "max_dynamic_patch": 12,
        "template": "internvl2_5",
        "torch_dtype": "bfloat16",
    }
