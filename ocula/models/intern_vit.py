"""InternViT, the vision tower of InternVL 1.5 / 2 / 2.5 / 3, under the original checkpoint's names.

Tree (`vision_model.*` in the original layout): `embeddings.{class_embedding, position_embedding,
patch_embedding}`, `encoder.layers.N.{norm1, attn.{qkv, q_norm, k_norm, proj}, ls1, norm2,
mlp.{fc1, fc2}, ls2}`. Each layer is pre-norm with layer scale:
    x = x + attn(norm1(x)) * ls1;  x = x + mlp(norm2(x)) * ls2.

Each tile is its own sequence (class token + patches) with bidirectional attention, so attention
is one call over [tiles, tokens, heads, head_dim]: the Triton kernel of `ocula.kernels.vit_attention`
on CUDA for head_dim <= 64 (InternViT-300M; measured faster than SDPA plus its transposes on an
H100), SDPA elsewhere (CPU, and InternViT-6B's head_dim 128, where SDPA's kernel is faster).

Tensor parallelism (over the vision group, which may differ from the LLM's): `qkv` and `fc1` are
column parallel (whole heads per rank), `proj` and `fc2` row parallel; embeddings, norms and layer
scales are replicated. The optional qk-norm is an RMSNorm over all heads' channels, so with
sharded heads its mean square is summed over the group; head counts that the group does not
divide (InternViT-6B's 25) are padded with zero heads (both in `intern_vit_shards.py`).

The encoder carries each layer's last residual add into the next layer's first norm, which on
CUDA is one Triton kernel (`ocula.kernels.layer_norm`); the values are the formula's above.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from ocula.distributed.parallel_group import ParallelGroup
from ocula.kernels import use_triton
from ocula.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from ocula.layers.norm import RMSNorm
from ocula.models.intern_vit_linear import fc1_with_table_activation, warm_up_fc1_kernel
from ocula.models.intern_vit_shards import (
    ChannelShardedRMSNorm,
    load_proj_columns,
    load_qkv_any_layout,
    padded_heads,
)
from ocula.models.internvl_config import InternViTConfig


def frozen_layer_norm(size: int, eps: float) -> nn.LayerNorm:
    norm = nn.LayerNorm(size, eps=eps)
    norm.requires_grad_(False)
    return norm


def make_norm(norm_type: str, size: int, eps: float) -> nn.Module:
    if norm_type == "layer_norm":
        return frozen_layer_norm(size, eps)
    if norm_type == "rms_norm":
        return RMSNorm(size, eps)
    raise ValueError(f"unknown InternViT norm_type {norm_type!r} (layer_norm, rms_norm)")


def interpolate_position_embedding(
    table: torch.Tensor, grid_height: int, grid_width: int
) -> torch.Tensor:
    """Position embeddings [1, 1 + g*g, C] trained on a g x g patch grid -> [1, 1 + h*w, C].

    The class token's row is kept; the patch rows are resized as a C-channel g x g image with
    bicubic interpolation (align_corners=False), computed in float32, then cast back.
    """
    trained_side = round((table.shape[1] - 1) ** 0.5)
    if trained_side * trained_side != table.shape[1] - 1:
        raise ValueError(f"position embeddings of {table.shape[1] - 1} patches are not a square")
    if (grid_height, grid_width) == (trained_side, trained_side):
        return table
    channels = table.shape[-1]
    grid = table[:, 1:].float().reshape(1, trained_side, trained_side, channels)
    resized = F.interpolate(
        grid.permute(0, 3, 1, 2),
        size=(grid_height, grid_width),
        mode="bicubic",
        align_corners=False,
    )
    patch_rows = resized.permute(0, 2, 3, 1).reshape(1, grid_height * grid_width, channels)
    return torch.cat([table[:, :1], patch_rows.to(table.dtype)], dim=1)


class InternViTEmbeddings(nn.Module):
    def __init__(self, config: InternViTConfig) -> None:
        super().__init__()
        size = config.hidden_size
        self.class_embedding = nn.Parameter(torch.empty(1, 1, size), requires_grad=False)
        self.patch_embedding = nn.Conv2d(
            config.num_channels, size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.patch_embedding.requires_grad_(False)
        trained_side = config.image_size // config.patch_size
        self.position_embedding = nn.Parameter(
            torch.empty(1, trained_side * trained_side + 1, size), requires_grad=False
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [tiles, channels, H, W] -> [tiles, 1 + (H/p)(W/p), hidden]."""
        pixels = pixel_values.to(self.patch_embedding.weight.dtype)
        if pixels.is_cuda:
            tokens, grid_height, grid_width = self.embed_patches_by_matmul(pixels)
        else:  # the reference's convolution, exactly
            patches = self.patch_embedding(pixels)
            grid_height, grid_width = patches.shape[2:]
            tokens = patches.flatten(2).transpose(1, 2)
        tiles = tokens.shape[0]
        class_tokens = self.class_embedding.expand(tiles, 1, -1).to(tokens.dtype)
        embeddings = torch.cat([class_tokens, tokens], dim=1)
        positions = interpolate_position_embedding(self.position_embedding, grid_height, grid_width)
        return embeddings + positions.to(embeddings.dtype)

    def embed_patches_by_matmul(self, pixels: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """The patch convolution (kernel = stride = p, so patches do not overlap) as one matmul
        of the unfolded patches: cuDNN ran this convolution as an implicit GEMM taking 2.2 ms
        for 32 tiles on an H200, for 39 GFLOP (0.05 ms at the matmul peak). Same products,
        summed in another float32 order. Returns ([tiles, gh * gw, hidden], gh, gw)."""
        conv = self.patch_embedding
        p = conv.kernel_size[0]
        tiles, channels, height, width = pixels.shape
        grid_height, grid_width = height // p, width // p
        pixels = pixels[:, :, : grid_height * p, : grid_width * p]  # what the stride leaves out
        patches = pixels.reshape(tiles, channels, grid_height, p, grid_width, p)
        patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(tiles, grid_height * grid_width, -1)
        tokens = F.linear(patches, conv.weight.flatten(1), conv.bias)
        return tokens, grid_height, grid_width


class InternViTAttention(nn.Module):
    def __init__(self, config: InternViTConfig, tp: ParallelGroup) -> None:
        super().__init__()
        size = config.hidden_size
        num_heads = config.num_attention_heads
        self.head_dim = size // num_heads
        heads = padded_heads(num_heads, tp.size)
        padded_size = heads * self.head_dim
        self.qkv = QKVParallelLinear(size, self.head_dim, heads, heads, config.qkv_bias, tp)
        for param in self.qkv.parameters():
            param.weight_loader = partial(load_qkv_any_layout, self.qkv, num_heads)
        self.q_norm = self.k_norm = None
        if config.qk_normalization:
            self.q_norm = ChannelShardedRMSNorm(size, config.qk_norm_eps, tp, padded_size)
            self.k_norm = ChannelShardedRMSNorm(size, config.qk_norm_eps, tp, padded_size)
        self.proj = RowParallelLinear(padded_size, size, True, tp)
        self.proj.weight.weight_loader = partial(load_proj_columns, self.proj, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [tiles, tokens, hidden] -> [tiles, tokens, hidden]; tiles do not see each other."""
        tiles, tokens, _ = x.shape
        q, k, v = self.qkv.split_output(self.qkv(x))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)

        scale = self.head_dim**-0.5
        if use_triton(x):
            # The kernel reads q, k, v as strided views of the fused projection and writes
            # [tiles, tokens, heads * head_dim] for proj: no transposes, no copies.
            from ocula.kernels.vit_attention import supports_head_dim, vit_attention

            if self.head_dim <= 64 and supports_head_dim(self.head_dim):
                q, k, v = (t.unflatten(-1, (-1, self.head_dim)) for t in (q, k, v))
                return self.proj(vit_attention(q, k, v, scale))

        def heads_first(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(tiles, tokens, -1, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            heads_first(q), heads_first(k), heads_first(v), scale=scale
        )
        return self.proj(out.transpose(1, 2).reshape(tiles, tokens, -1))


# Activations that torch computes element by element, which a 16-bit tensor on CUDA takes through
# a lookup table instead (`ocula.kernels.table_activation`: bit-identical, and for exact GELU
# cheaper than erf's arithmetic). transformers' "gelu" is F.gelu (tested). USE_TABLE_ACTIVATIONS:
# a constant the benchmarks' `--switches table_activation=off` clear for an A/B.
TABLE_ACTIVATIONS = {"gelu": F.gelu}
USE_TABLE_ACTIVATIONS = True


def warm_up_table_activations(hidden_act: str, dtype: torch.dtype, device: torch.device) -> None:
    """Compiles the table path of `InternViTMLP` ahead of its first large batch (eager start-up:
    the warm-up forward of one tile is below `MIN_TABLE_ELEMENTS`)."""
    function = TABLE_ACTIVATIONS.get(hidden_act)
    if function is None or not USE_TABLE_ACTIVATIONS or device.type != "cuda":
        return
    from ocula.kernels.table_activation import TABLE_DTYPES, warm_up

    if dtype in TABLE_DTYPES:
        warm_up(function, dtype, device)


class InternViTMLP(nn.Module):
    def __init__(self, config: InternViTConfig, tp: ParallelGroup) -> None:
        super().__init__()
        self.fc1 = ColumnParallelLinear(config.hidden_size, config.intermediate_size, True, tp)
        self.act = ACT2FN[config.hidden_act]
        self.table_act = TABLE_ACTIVATIONS.get(config.hidden_act)
        self.fc2 = RowParallelLinear(config.intermediate_size, config.hidden_size, True, tp)

    def warm_up_fused_fc1(self) -> None:
        """Compiles fc1's kernel with its activation table at start-up (`intern_vit_linear`)."""
        if self.table_act is not None and USE_TABLE_ACTIVATIONS:
            warm_up_fc1_kernel(self.fc1, self.table_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.table_act is not None and USE_TABLE_ACTIVATIONS:
            activated = fc1_with_table_activation(self.fc1, x, self.table_act)
            if activated is not None:
                return self.fc2(activated)
        hidden = self.fc1(x)
        if self.table_act is not None and USE_TABLE_ACTIVATIONS and use_triton(hidden):
            from ocula.kernels.table_activation import table_activation_, worth_a_table

            if worth_a_table(hidden):
                return self.fc2(table_activation_(hidden, self.table_act))
        return self.fc2(self.act(hidden))


class InternViTLayer(nn.Module):
    def __init__(self, config: InternViTConfig, tp: ParallelGroup) -> None:
        super().__init__()
        size = config.hidden_size
        self.norm1 = make_norm(config.norm_type, size, config.layer_norm_eps)
        self.attn = InternViTAttention(config, tp)
        self.ls1 = nn.Parameter(torch.empty(size), requires_grad=False)
        self.norm2 = make_norm(config.norm_type, size, config.layer_norm_eps)
        self.mlp = InternViTMLP(config, tp)
        self.ls2 = nn.Parameter(torch.empty(size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2

    def forward_deferred(
        self, x: torch.Tensor, pending: PendingUpdate | None
    ) -> tuple[torch.Tensor, PendingUpdate]:
        """The layer with its residual adds deferred into the following norm: the input is
        `x + pending`, the output `x' + returned pending` (same values as `forward`). `x` is the
        residual stream and is updated in place."""
        normed, x = add_then_norm(self.norm1, x, pending)
        normed, x = add_then_norm(self.norm2, x, (self.attn(normed), self.ls1))
        return x, (self.mlp(normed), self.ls2)


# A residual update not yet added: x + update * scale.
PendingUpdate = tuple[torch.Tensor, torch.Tensor]


def add_then_norm(
    norm: nn.Module, x: torch.Tensor, pending: PendingUpdate | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + update * scale), x + update * scale), rounded as the unfused ops round. On CUDA a
    LayerNorm runs as one Triton kernel that updates `x` in place."""
    if isinstance(norm, nn.LayerNorm) and use_triton(x):
        from ocula.kernels.layer_norm import scaled_residual_layer_norm

        update, scale = pending if pending is not None else (None, None)
        return scaled_residual_layer_norm(x, update, scale, norm.weight, norm.bias, norm.eps)
    if pending is not None:
        x = x + pending[0] * pending[1]
    return norm(x), x


class InternViTEncoder(nn.Module):
    def __init__(self, config: InternViTConfig, num_layers: int, tp: ParallelGroup) -> None:
        super().__init__()
        self.layers = nn.ModuleList(InternViTLayer(config, tp) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [tiles, tokens, hidden] (consumed: the residual stream is updated in place)."""
        pending = None
        for layer in self.layers:
            x, pending = layer.forward_deferred(x, pending)
        if pending is not None:
            x = x + pending[0] * pending[1]
        return x


def layers_needed(num_hidden_layers: int, select_layer: int) -> int:
    """How many layers produce hidden state `select_layer` (index into [embeddings, layer 1 out,
    ..., layer L out], negative from the end), so later layers need not be built at all."""
    needed = select_layer if select_layer >= 0 else num_hidden_layers + 1 + select_layer
    if not 0 <= needed <= num_hidden_layers:
        raise ValueError(
            f"select_layer {select_layer} is outside a ViT of {num_hidden_layers} layers"
        )
    return needed


class InternViT(nn.Module):
    """pixel_values [tiles, 3, S, S] -> hidden state `select_layer` [tiles, 1 + (S/p)^2, hidden]."""

    def __init__(self, config: InternViTConfig, select_layer: int, tp: ParallelGroup) -> None:
        super().__init__()
        heads = config.num_attention_heads
        if config.hidden_size % heads != 0:
            raise ValueError(f"hidden size {config.hidden_size} is not a multiple of {heads} heads")
        self.config = config
        self.embeddings = InternViTEmbeddings(config)
        num_layers = layers_needed(config.num_hidden_layers, select_layer)
        self.encoder = InternViTEncoder(config, num_layers, tp)
        # transformers applies its final LayerNorm only to the last layer's output (select -1).
        self.final_layernorm = None
        if config.final_layernorm and select_layer == -1:
            self.final_layernorm = frozen_layer_norm(config.hidden_size, config.layer_norm_eps)

    @property
    def num_layers(self) -> int:
        return len(self.encoder.layers)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(self.embeddings(pixel_values))
        if self.final_layernorm is not None:
            hidden = self.final_layernorm(hidden)
        return hidden
