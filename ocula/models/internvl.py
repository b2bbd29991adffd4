"""InternVL (1.5 / 2 / 2.5 / 3): InternViT + pixel shuffle + `mlp1` projector + a text decoder.

One class serves both checkpoint layouts (original `InternVLChatModel`, HF
`InternVLForConditionalGeneration`); its tree is the original layout's (`vision_model`, `mlp1`,
`language_model`) and `internvl_weights` renames HF checkpoints onto it. The language model is an
existing text model class (Llama/Qwen2/InternLM2), composed, with its own names and fusions.

Engine interface:
- `encode_images(pixel_values [tiles, 3, S, S]) -> [tiles, tokens_per_tile, llm_hidden]`;
- `forward(batch) -> hidden`: the LLM forward; image embeddings arrive in `batch.spliced_embeds`
  at `batch.spliced_rows` (the IMG_CONTEXT rows);
- `compute_logits`, `load_weights`, `kv_cache_shape`, `max_context_len`, as text models;
- `config` (InternVLModelConfig): `image_size`, `patch_size`, `downsample_ratio`,
  `tokens_per_tile`, tiling settings, `image_token_id` / `image_token_id_for(tokenizer)` and the
  `<img>` / `</img>` / `<IMG_CONTEXT>` strings.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from transformers.activations import ACT2FN

from ocula.distributed.parallel_group import SINGLE_RANK, ParallelGroup
from ocula.engine.forward_batch import ForwardBatch
from ocula.layers.attention import AttentionBackend
from ocula.layers.linear import CheckpointTensor, ColumnParallelLinear, RowParallelLinear
from ocula.models.intern_vit import InternViT, frozen_layer_norm, warm_up_table_activations
from ocula.models.internvl_config import InternVLModelConfig
from ocula.models.internvl_weights import VISION_PACKED_MAPPING, load_internvl_weights
from ocula.models.registry import resolve_model_class
from ocula.models.weight_routing import PackedMapping, WeightKey

PS_VERSIONS = ("v1", "v2")


def shuffle_factor(downsample_ratio: float) -> int:
    """The s of a pixel shuffle that merges s x s patches (downsample_ratio = 1 / s)."""
    factor = round(1 / downsample_ratio)
    if factor < 1 or not math.isclose(factor * downsample_ratio, 1.0):
        raise ValueError(f"downsample_ratio {downsample_ratio} is not 1 / an integer")
    return factor


def pixel_shuffle(features: torch.Tensor, downsample_ratio: float, ps_version: str) -> torch.Tensor:
    """features [tiles, rows, cols, C] -> [tiles, rows/s, cols/s, s*s*C], s = 1 / downsample_ratio.

    Output cell (i, j) holds the s x s patches at rows s*i + a, columns s*j + b, with channels
    ordered (a, b, c): index a*s*C + b*C + c. "v2" lays cells out row-major, [tiles, i, j, ...]
    (what transformers always does); "v1" (InternVL's legacy default) leaves the grid transposed,
    [tiles, j, i, ...], so its tokens come column by column.
    """
    if ps_version not in PS_VERSIONS:
        raise ValueError(f"unknown ps_version {ps_version!r}; expected one of {PS_VERSIONS}")
    s = shuffle_factor(downsample_ratio)
    tiles, rows, cols, channels = features.shape
    if rows % s or cols % s:
        raise ValueError(f"a {rows} x {cols} patch grid cannot be pixel-shuffled by {s}")
    cells = features.reshape(tiles, rows // s, s, cols // s, s, channels)  # [t, i, a, j, b, c]
    order = (0, 1, 3, 2, 4, 5) if ps_version == "v2" else (0, 3, 1, 2, 4, 5)
    cells = cells.permute(*order)
    return cells.reshape(*cells.shape[:3], s * s * channels)


class InternVLChatModel(nn.Module):
    def __init__(
        self,
        config: InternVLModelConfig,
        tp: ParallelGroup = SINGLE_RANK,
        attention_backend: AttentionBackend | None = None,
        vision_tp: ParallelGroup | None = None,
    ) -> None:
        """`tp` shards the language model; `vision_tp` (default: `tp`) the ViT and projector."""
        super().__init__()
        self.config = config
        self.tp = tp
        self.vision_tp = vision_tp if vision_tp is not None else tp
        vit = config.vision_config
        self.vision_model = InternViT(vit, config.select_layer, self.vision_tp)
        shuffled_size = vit.hidden_size * shuffle_factor(config.downsample_ratio) ** 2
        llm_hidden = config.text_config.hidden_size
        # Indices as in the checkpoint: mlp1.0 LayerNorm, mlp1.1 Linear, mlp1.3 Linear.
        self.mlp1 = nn.Sequential(
            frozen_layer_norm(shuffled_size, 1e-5),
            ColumnParallelLinear(shuffled_size, llm_hidden, True, self.vision_tp),
            ACT2FN[config.projector_hidden_act],
            RowParallelLinear(llm_hidden, llm_hidden, True, self.vision_tp),
        )
        language_class = resolve_model_class(config.text_config)
        self.language_model = language_class(config.text_config, tp, attention_backend)
        # What completeness checks read: the language model's fusions plus the ViT's qkv shards.
        self.packed_modules_mapping: PackedMapping = {
            **self.language_model.packed_modules_mapping,
            **VISION_PACKED_MAPPING,
        }

    @property
    def image_token_id(self) -> int | None:
        return self.config.image_token_id

    @property
    def tokens_per_tile(self) -> int:
        return self.config.tokens_per_tile

    def warm_up_kernels(self, dtype: torch.dtype, device: torch.device) -> None:
        """Builds the tables and compiles the vision kernels that only large eager batches or
        CUDA-graph captures take, before either runs (start-up)."""
        warm_up_table_activations(self.config.vision_config.hidden_act, dtype, device)
        for layer in self.vision_model.encoder.layers[:1]:  # every layer has these shapes
            layer.mlp.warm_up_fused_fc1()

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [tiles, 3, S, S] -> embeddings [tiles, tokens_per_tile, llm_hidden]."""
        hidden = self.vision_model(pixel_values)
        patches = hidden[:, 1:]  # the class token is dropped
        tiles, num_patches, channels = patches.shape
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(f"{num_patches} patches per tile do not form a square grid")
        grid = patches.reshape(tiles, side, side, channels)
        shuffled = pixel_shuffle(grid, self.config.downsample_ratio, self.config.ps_version)
        return self.mlp1(shuffled.reshape(tiles, -1, shuffled.shape[-1]))

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Final hidden states [T, hidden] of every new token of the batch."""
        return self.language_model(batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [S, hidden] (rows picked by the caller) -> float32 logits [S, vocab]."""
        return self.language_model.compute_logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, CheckpointTensor]]) -> set[WeightKey]:
        return load_internvl_weights(self, weights, self.config.layout)

    def max_context_len(self) -> int:
        return self.language_model.max_context_len()

    def kv_cache_shape(self) -> tuple[int, int, int]:
        return self.language_model.kv_cache_shape()
