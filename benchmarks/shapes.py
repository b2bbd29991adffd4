"""The shapes of the benchmark checkpoints: the real models' hyper-parameters, and tiny twins.

Real shapes (from the published configs):
- InternVL3-8B = InternViT-300M-448px (24 layers, width 1024, 16 heads, MLP 4096, 448 px tiles
  of 14 px patches, pixel shuffle 0.5: 256 tokens per tile, LayerNorm, qkv bias, no qk-norm)
  + projector + Qwen2.5-7B (width 3584, 28 layers, 28 heads, 4 KV heads, MLP 18944, RoPE theta
  1e6, 32768 positions, untied LM head).
- InternVL2.5-8B = InternViT-300M-448px-V2_5 (same shape) + InternLM2.5-7B (width 4096, 32
  layers, 32 heads, 8 KV heads, MLP 14336, RoPE theta 1e6).

Vocabulary: the real Qwen2 tokenizer plus InternVL's 9 added tokens, 151,674 ids, for both
models (InternVL3-8B's own size). InternLM2.5's own vocabulary (92,553) is not available
offline, so the InternVL2.5 checkpoint's embedding and LM head have 151,674 rows instead:
0.97 GB more weights than the real model.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VisionShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    image_size: int = 448
    patch_size: int = 14
    downsample_ratio: float = 0.5


@dataclass(frozen=True)
class TextShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    max_positions: int = 32768
    rope_theta: float = 1_000_000.0


@dataclass(frozen=True)
class ModelSpec:
    name: str  # the checkpoint folder's name
    layout: str  # "hf" (InternVLForConditionalGeneration) or "original" (InternVLChatModel)
    text_arch: str  # "qwen2" or "internlm2"
    vision: VisionShape
    text: TextShape


INTERNVIT_300M = VisionShape(hidden=1024, intermediate=4096, layers=24, heads=16)
QWEN25_7B = TextShape(hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4)
INTERNLM25_7B = TextShape(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8)

# Tiny twins keep the 448 px tiles (so 256 tokens per tile, the engine's default) and shrink
# every width and depth: a CPU runs the whole suite on them in minutes.
TINY_VISION = VisionShape(hidden=32, intermediate=64, layers=2, heads=2)
TINY_TEXT = TextShape(
    hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, max_positions=4096
)

INTERNVL3_8B = ModelSpec("internvl3-8b", "hf", "qwen2", INTERNVIT_300M, QWEN25_7B)
INTERNVL25_8B = ModelSpec("internvl2_5-8b", "original", "internlm2", INTERNVIT_300M, INTERNLM25_7B)
TEXT_TWIN_NAME = "qwen2.5-7b-text"  # the language model of INTERNVL3_8B as a text checkpoint


def model_spec(name: str, tiny: bool) -> ModelSpec:
    spec = {"internvl3-8b": INTERNVL3_8B, "internvl2_5-8b": INTERNVL25_8B}[name]
    if not tiny:
        return spec
    return ModelSpec(spec.name + "-tiny", spec.layout, spec.text_arch, TINY_VISION, TINY_TEXT)


def text_twin_name(tiny: bool) -> str:
    return TEXT_TWIN_NAME + ("-tiny" if tiny else "")


# InternVL's added tokens, in the id order of InternVL3's tokenizer (after Qwen2.5's 151,665).
IMAGE_TOKENS = (
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
)
