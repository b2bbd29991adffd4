"""InternVL in both checkpoint layouts computes what transformers' InternVLForConditionalGeneration
computes: image features, and greedy tokens of prompts with images spliced in."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import PreTrainedModel, PreTrainedTokenizerFast
from transformers.models.internvl.modeling_internvl import InternVLModel

from ocula.distributed.parallel_group import ParallelGroup
from ocula.models.hf_config import load_text_config, torch_dtype_of
from ocula.models.intern_vit import InternViT, interpolate_position_embedding
from ocula.models.internvl import InternVLChatModel, pixel_shuffle
from ocula.models.loader import load_model
from ocula.models.weight_routing import CheckpointMismatchError, check_complete
from tests.helpers.forward import PagedRunner
from tests.helpers.tiny_internvl import (
    TOKENS_PER_TILE,
    load_hf_reference,
    make_hf_internvl,
    write_original_layout,
)
from tests.models.test_tp_forward import ThreadedGroup

NEW_TOKENS = 6
TILE_PIXELS = 56
# fp32 on CPU: the implementations differ only in summation order (fused q/k/v, paged attention).
TOLERANCE = {"atol": 5e-5, "rtol": 1e-5}
QK_RMS = {"use_qk_norm": True, "norm_type": "rms_norm", "attention_bias": False}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("internvl")
    hf_qwen2 = make_hf_internvl(root / "hf_qwen2", "qwen2")
    hf_llama = make_hf_internvl(root / "hf_llama", "llama", seed=1)
    hf_qk_rms = make_hf_internvl(root / "hf_qk_rms", "qwen2", seed=2, **QK_RMS)
    return {
        "hf_qwen2": hf_qwen2,
        "hf_llama": hf_llama,
        "hf_qk_rms": hf_qk_rms,
        "hf_select_layer": make_hf_internvl(root / "hf_select", "qwen2", vision_feature_layer=-2),
        "original_qwen2": write_original_layout(hf_qwen2, root / "orig_qwen2", "qwen2"),
        "original_internlm2": write_original_layout(hf_llama, root / "orig_internlm2", "internlm2"),
        "original_qk_rms": write_original_layout(hf_qk_rms, root / "orig_qk_rms", "qwen2"),
    }


# The transformers model each checkpoint must match.
REFERENCE_OF = {
    "original_qwen2": "hf_qwen2",
    "original_internlm2": "hf_llama",
    "original_qk_rms": "hf_qk_rms",
}


@cache
def reference(path: Path) -> PreTrainedModel:
    return load_hf_reference(path)


def load_ocula(path: Path, **kwargs: Any) -> torch.nn.Module:
    return load_model(path, load_text_config(path), torch.float32, "cpu", **kwargs)


@cache
def ocula_model(path: Path) -> torch.nn.Module:
    return load_ocula(path)


def pixels(tiles: int, seed: int = 0, size: int = TILE_PIXELS) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tiles, 3, size, size, generator=generator)


def image_prompt(checkpoint: Path, tiles_per_image: Sequence[int]) -> list[int]:
    """Text, then per image `<img>` + tiles x 4 `<IMG_CONTEXT>` + `</img>` and more text."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(checkpoint))
    start, end, context = tokenizer.convert_tokens_to_ids(["<img>", "</img>", "<IMG_CONTEXT>"])
    ids = tokenizer("the quick brown fox")["input_ids"]
    for index, tiles in enumerate(tiles_per_image):
        ids += [start] + [context] * tiles * TOKENS_PER_TILE + [end]
        ids += tokenizer(f" image {index} shows servers and caches")["input_ids"]
    return ids


@torch.no_grad()
def ocula_greedy(
    model: Any,
    prompt_ids: list[int],
    pixel_values: torch.Tensor,
    image_token_id: int,
    chunk_sizes: Sequence[int] | None = None,
) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and logits, the prompt prefilled in chunks with image rows spliced in."""
    embeds = model.encode_images(pixel_values).flatten(0, 1)  # one row per IMG_CONTEXT token
    image_rows = [i for i, token in enumerate(prompt_ids) if token == image_token_id]
    assert len(image_rows) == embeds.shape[0]
    runner = PagedRunner(model)
    bounds = [0]
    for size in chunk_sizes or [len(prompt_ids)]:
        bounds.append(bounds[-1] + size)
    assert bounds[-1] == len(prompt_ids)
    for first, end in itertools.pairwise(bounds):
        batch = runner.build_batch([(0, prompt_ids[first:end])])
        picked = [n for n, row in enumerate(image_rows) if first <= row < end]
        if picked:
            batch.spliced_embeds = embeds[picked]
            batch.spliced_rows = torch.tensor([image_rows[n] - first for n in picked])
        hidden = model(batch)
        logits = [model.compute_logits(hidden[batch.logits_indices])[0]]
        runner.lengths[0] += end - first
    tokens = [int(logits[-1].argmax())]
    while len(tokens) < NEW_TOKENS:
        logits.append(runner.step([(0, [tokens[-1]])])[0])
        tokens.append(int(logits[-1].argmax()))
    return tokens, torch.stack(logits)


@torch.no_grad()
def reference_greedy(
    model: PreTrainedModel, prompt_ids: list[int], pixel_values: torch.Tensor
) -> tuple[list[int], torch.Tensor]:
    input_ids = torch.tensor([prompt_ids])
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pixel_values=pixel_values,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.sequences[0, input_ids.shape[1] :].tolist(), torch.cat(out.logits).float()


def reference_features(path: Path, pixel_values: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return reference(path).get_image_features(pixel_values=pixel_values).pooler_output


def assert_features_match(name: str, checkpoints: dict[str, Path], size: int = 56) -> None:
    pixel_values = pixels(3, seed=7, size=size)
    with torch.no_grad():
        features = ocula_model(checkpoints[name]).encode_images(pixel_values)
    expected = reference_features(checkpoints[REFERENCE_OF.get(name, name)], pixel_values)
    torch.testing.assert_close(features, expected, **TOLERANCE)


def assert_greedy_matches(
    name: str,
    checkpoints: dict[str, Path],
    tiles_per_image: Sequence[int],
    chunk_sizes: Sequence[int] | None = None,
) -> None:
    path = checkpoints[name]
    reference_path = checkpoints[REFERENCE_OF.get(name, name)]
    prompt_ids = image_prompt(path, tiles_per_image)
    pixel_values = pixels(sum(tiles_per_image), seed=len(tiles_per_image))
    image_token_id = reference(reference_path).config.image_token_id
    expected_tokens, expected_logits = reference_greedy(
        reference(reference_path), prompt_ids, pixel_values
    )
    tokens, logits = ocula_greedy(
        ocula_model(path), prompt_ids, pixel_values, image_token_id, chunk_sizes
    )
    assert tokens == expected_tokens
    torch.testing.assert_close(logits, expected_logits, **TOLERANCE)


@pytest.mark.parametrize("name", ["hf_qwen2", "original_qwen2", "original_internlm2"])
def test_image_features_match_transformers(checkpoints: dict[str, Path], name: str) -> None:
    assert_features_match(name, checkpoints)


@pytest.mark.parametrize(
    "tiles_per_image", [[1], [3], [2, 1]], ids=["1-tile", "3-tiles", "2-images"]
)
def test_hf_layout_greedy_with_images(checkpoints: dict[str, Path], tiles_per_image: list) -> None:
    assert_greedy_matches("hf_qwen2", checkpoints, tiles_per_image)


@pytest.mark.parametrize("name", ["original_qwen2", "original_internlm2"])
def test_original_layout_greedy_with_images(checkpoints: dict[str, Path], name: str) -> None:
    assert_greedy_matches(name, checkpoints, [2, 1])


def test_prefill_chunks_that_cut_through_an_image(checkpoints: dict[str, Path]) -> None:
    # The prompt (5 text tokens, then <img> + 12 image rows) is cut inside the first image.
    prompt_len = len(image_prompt(checkpoints["hf_qwen2"], [3, 1]))
    assert_greedy_matches("hf_qwen2", checkpoints, [3, 1], [9, 10, prompt_len - 19])


def test_qk_norm_and_rms_norm_match_transformers(checkpoints: dict[str, Path]) -> None:
    model = ocula_model(checkpoints["hf_qk_rms"])
    assert model.vision_model.encoder.layers[0].attn.q_norm is not None
    assert_features_match("hf_qk_rms", checkpoints)
    assert_features_match("original_qk_rms", checkpoints)
    assert_greedy_matches("original_qk_rms", checkpoints, [1, 1])


def test_select_layer_runs_only_the_layers_it_needs(checkpoints: dict[str, Path]) -> None:
    model = ocula_model(checkpoints["hf_select_layer"])
    assert model.vision_model.num_layers == 1  # vision_feature_layer -2 of 2 layers
    assert_features_match("hf_select_layer", checkpoints)


def test_position_embeddings_interpolate_for_other_image_sizes(
    checkpoints: dict[str, Path],
) -> None:
    # 84 px tiles: a 6 x 6 patch grid from position embeddings trained on 4 x 4.
    assert_features_match("hf_qwen2", checkpoints, size=84)
    assert_features_match("original_qk_rms", checkpoints, size=84)
    hf_embeddings = reference(checkpoints["hf_qwen2"]).model.vision_tower.embeddings
    table = hf_embeddings.position_embeddings.detach()
    expected = hf_embeddings.interpolate_pos_encoding(torch.zeros(1, 37, 32), 84, 84)
    torch.testing.assert_close(interpolate_position_embedding(table, 6, 6), expected)
    assert interpolate_position_embedding(table, 4, 4) is table


def test_pixel_shuffle_versions() -> None:
    features = torch.randn(2, 4, 4, 8)
    # transformers' pixel shuffle (always "v2") does not use its module's state.
    expected_v2 = InternVLModel.pixel_shuffle(None, features, scale_factor=0.5)
    torch.testing.assert_close(pixel_shuffle(features, 0.5, "v2"), expected_v2, rtol=0, atol=0)
    # v1 keeps the grid transposed: cell (i, j) sits at [j, i], with the same channels.
    v1 = pixel_shuffle(features, 0.5, "v1")
    torch.testing.assert_close(v1, expected_v2.transpose(1, 2), rtol=0, atol=0)
    # Cell (0, 1) of v2 holds rows 0-1, columns 2-3, channels ordered (row, column, channel).
    expected_cell = torch.cat(
        [features[0, 0, 2], features[0, 0, 3], features[0, 1, 2], features[0, 1, 3]]
    )
    torch.testing.assert_close(pixel_shuffle(features, 0.5, "v2")[0, 0, 1], expected_cell)
    with pytest.raises(ValueError, match="ps_version"):
        pixel_shuffle(features, 0.5, "v3")


def test_config_values_the_engine_needs(checkpoints: dict[str, Path]) -> None:
    original = ocula_model(checkpoints["original_internlm2"])
    config = original.config
    assert (config.image_size, config.patch_size, config.downsample_ratio) == (56, 14, 0.5)
    assert original.tokens_per_tile == TOKENS_PER_TILE
    assert (config.max_dynamic_patch, config.use_thumbnail, config.template) == (
        12,
        True,
        "internvl2_5",
    )
    assert original.image_token_id is None  # the original layout names it in the tokenizer
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(checkpoints["original_internlm2"]))
    assert config.image_token_id_for(tokenizer) == tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert config.vocab_size == len(tokenizer)
    assert torch_dtype_of(config) == torch.float32
    hf = ocula_model(checkpoints["hf_qwen2"])
    assert hf.image_token_id == reference(checkpoints["hf_qwen2"]).config.image_token_id
    assert (hf.config.image_start_token, hf.config.image_end_token) == ("<img>", "</img>")


def test_vision_tp_pads_heads_but_must_divide_the_mlp(checkpoints: dict[str, Path]) -> None:
    config = load_text_config(checkpoints["hf_qwen2"]).vision_config  # 2 heads, MLP 64
    padded = InternViT(config, -1, ParallelGroup(rank=1, size=4))  # heads padded from 2 to 4
    assert padded.encoder.layers[0].attn.qkv.num_heads == 4
    with pytest.raises(ValueError, match=r"output size \(64\) is not divisible by .* size 3"):
        InternViT(config, -1, ParallelGroup(rank=0, size=3))


def test_vision_tensor_parallel_matches_one_rank(checkpoints: dict[str, Path]) -> None:
    # Stacked qkv sliced per rank, qk-norm statistics summed over ranks, row-parallel proj/fc2.
    path = checkpoints["original_qk_rms"]
    pixel_values = pixels(2, seed=3)
    with torch.no_grad():
        expected = ocula_model(path).encode_images(pixel_values)
    size = 2
    barrier, slots = threading.Barrier(size), [None] * size
    ranks = [load_ocula(path, tp=ThreadedGroup(r, size, barrier, slots)) for r in range(size)]

    def run(model: Any) -> torch.Tensor:
        with torch.no_grad():
            return model.encode_images(pixel_values)

    with ThreadPoolExecutor(size) as pool:
        results = list(pool.map(run, ranks))
    for result in results:
        torch.testing.assert_close(result, expected, **TOLERANCE)


def test_missing_vision_weights_are_reported(checkpoints: dict[str, Path]) -> None:
    path = checkpoints["original_qwen2"]
    state = load_file(str(path / "model.safetensors"))
    del state["vision_model.encoder.layers.1.attn.qkv.weight"]
    del state["mlp1.3.bias"]
    model = InternVLChatModel(load_text_config(path))
    loaded = model.load_weights(state.items())
    with pytest.raises(CheckpointMismatchError, match="lacks 4 weight") as error:
        check_complete(model, model.packed_modules_mapping, loaded)
    assert "vision_model.encoder.layers.1.attn.qkv.weight [q]" in str(error.value)
    assert "mlp1.3.bias" in str(error.value)


def test_patch_embedding_as_one_matmul_equals_the_convolution() -> None:
    """The CUDA path unfolds patches into one matmul; on any device it must give the
    convolution's values (float32 rounding apart), cropping what the stride leaves out."""
    from ocula.models.intern_vit import InternViTEmbeddings
    from ocula.models.internvl_config import InternViTConfig

    config = InternViTConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=7,
    )
    embeddings = InternViTEmbeddings(config)
    generator = torch.Generator().manual_seed(3)
    conv = embeddings.patch_embedding
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator))
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator))
    for height, width in [(28, 28), (30, 47)]:
        pixels = torch.randn(3, 3, height, width, generator=generator)
        tokens, grid_height, grid_width = embeddings.embed_patches_by_matmul(pixels)
        expected = conv(pixels)
        assert (grid_height, grid_width) == tuple(expected.shape[2:])
        expected = expected.flatten(2).transpose(1, 2)
        torch.testing.assert_close(tokens, expected, atol=1e-5, rtol=1e-5)
