"""The vision encoder split over ranks: (visual_dp, visual_tp) layouts give tp=1's embeddings.

Each case starts `tp` gloo processes that build the real `ModelRunner` of their rank (the vision
subgroups, the sharded ViT and LLM, the KV pool agreed on) and encode the same step's images;
every rank must end up with every image's embeddings, bit-identical on all ranks (they come from
one broadcast). Against tp=1 they agree to the LLM TP tests' tolerance: tensor-parallel groups
add row-parallel partial sums in another order, and data-parallel groups batch other images
together than one rank does, which changes the CPU matmul's blocking in the last bits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ocula.config import EngineArgs
from ocula.distributed.launch import leave_group
from ocula.distributed.parallel_group import SINGLE_RANK, ParallelGroup
from ocula.distributed.vision_groups import VisionLayout, assign_images
from ocula.engine.engine_core import build_model_runner
from ocula.engine.image_inputs import EncoderInput
from ocula.engine.model_setup import resolve_model
from tests.helpers.tiny_internvl import make_hf_internvl

TOLERANCE = {"atol": 5e-5, "rtol": 1e-5}
TILES = (3, 1, 2, 1, 5)  # five images of different tile counts: shares are uneven


def encoder_inputs(image_size: int) -> list[EncoderInput]:
    generator = torch.Generator().manual_seed(7)
    inputs, first_page = [], 0
    for i, tiles in enumerate(TILES):
        pixels = torch.randn(tiles, 3, image_size, image_size, generator=generator)
        inputs.append(
            EncoderInput(f"image-{i}", pixels, list(range(first_page, first_page + tiles)))
        )
        first_page += tiles
    return inputs


def engine_args(checkpoint: Path, tp: int, visual_dp: int, visual_tp: int) -> EngineArgs:
    return EngineArgs(
        model_dir=str(checkpoint),
        tp=tp,
        visual_dp=visual_dp,
        visual_tp=visual_tp,
        device="cpu",
        enable_multimodal=True,
        max_total_token_num=256,
        visual_infer_batch_size=2,
    )


def encode(args: EngineArgs, group: ParallelGroup) -> dict[str, torch.Tensor]:
    runner = build_model_runner(args, resolve_model(args), group)
    assert runner.image_encoder is not None
    size = runner.model.config.image_size
    return runner.image_encoder.encode(encoder_inputs(size))


def _rank(rank: int, args: EngineArgs, store: Path, out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=args.tp)
    try:
        embeddings = encode(args, ParallelGroup(rank, args.tp, dist.group.WORLD))
        torch.save(embeddings, out / f"rank{rank}.pt")
    finally:
        leave_group()  # frees the group too: see there why


@pytest.fixture(scope="module")
def internvl_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_internvl(tmp_path_factory.mktemp("internvl"), "qwen2")


@pytest.fixture(scope="module")
def padded_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 heads of 16 channels with InternViT-6B's qk-norm: visual_tp 2 pads them to 4."""
    return make_hf_internvl(
        tmp_path_factory.mktemp("internvl3heads"),
        "qwen2",
        hidden_size=48,
        num_attention_heads=3,
        use_qk_norm=True,
        norm_type="rms_norm",
        attention_bias=False,
    )


def single_rank_embeddings(checkpoint: Path) -> dict[str, torch.Tensor]:
    return encode(engine_args(checkpoint, 1, 1, 1), SINGLE_RANK)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("tp", "visual_dp", "visual_tp", "heads"),
    [
        (2, 1, 2, 2),
        (2, 2, 1, 2),
        (4, 2, 2, 2),
        (4, 1, 4, 2),  # 2 heads over 4 ranks: two padding heads
        (2, 1, 2, 3),  # 3 heads over 2 ranks, qk-norm over 48 real channels
    ],
)
def test_every_rank_gets_single_rank_embeddings(
    request, tmp_path, tp, visual_dp, visual_tp, heads
) -> None:
    checkpoint = request.getfixturevalue(
        "internvl_checkpoint" if heads == 2 else "padded_checkpoint"
    )
    expected_embeddings = single_rank_embeddings(checkpoint)
    args = engine_args(checkpoint, tp, visual_dp, visual_tp)
    mp.spawn(_rank, args=(args, tmp_path / "store", tmp_path), nprocs=tp)
    per_rank = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(tp)]
    for rank, got in enumerate(per_rank):
        assert got.keys() == expected_embeddings.keys()
        for key, expected in expected_embeddings.items():
            assert torch.equal(got[key], per_rank[0][key]), (rank, key)
            torch.testing.assert_close(got[key], expected, **TOLERANCE)


def test_images_are_dealt_to_the_least_loaded_group() -> None:
    assert assign_images([3, 1, 2, 1, 5], 2) == [0, 1, 1, 0, 1]
    assert assign_images([1, 1, 1], 1) == [0, 0, 0]
    assert assign_images([], 4) == []
    layout = VisionLayout(dp=2, tp=2)
    assert [layout.group_of(r) for r in range(4)] == [0, 0, 1, 1]
    assert [layout.leader_of(g) for g in range(2)] == [0, 2]


def test_a_batch_mixing_uint8_tiles_and_float_pixels_normalizes_each() -> None:
    from ocula.engine.image_encoder import ImageEncoder
    from ocula.engine.image_inputs import EncoderInput
    from ocula.multimodal.image_processing import normalize_pixels

    seen: list[torch.Tensor] = []

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        seen.append(pixels)
        return pixels.reshape(pixels.shape[0], 1, -1)[:, :, :4]

    encoder = ImageEncoder(
        encode, 1, 4, torch.float32, torch.device("cpu"), 4, SINGLE_RANK, VisionLayout(1, 1)
    )
    tiles = torch.randint(0, 256, (1, 3, 2, 2), dtype=torch.uint8)
    floats = torch.randn(2, 3, 2, 2)
    encoder.encode([EncoderInput("a", tiles, [0]), EncoderInput("b", floats, [1, 2])])
    assert torch.equal(seen[0], torch.cat([normalize_pixels(tiles), floats]))


def test_images_sent_in_one_transfer_are_encoded_in_batches_of_their_own_tiles() -> None:
    from ocula.engine.image_encoder import ImageEncoder
    from ocula.engine.image_inputs import EncoderInput
    from ocula.multimodal.image_processing import normalize_pixels

    seen: list[torch.Tensor] = []

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        seen.append(pixels)
        return pixels.reshape(pixels.shape[0], 1, -1)[:, :, :4] * 2

    encoder = ImageEncoder(
        encode, 1, 4, torch.float32, torch.device("cpu"), 2, SINGLE_RANK, VisionLayout(1, 1)
    )
    images = [torch.randint(0, 256, (n, 3, 2, 2), dtype=torch.uint8) for n in (1, 2, 1)]
    inputs = [EncoderInput(key, tiles, []) for key, tiles in zip("abc", images, strict=True)]
    result = encoder.encode(inputs)
    # Two images per ViT forward, as --visual_infer_batch_size 2 asks: 3 tiles, then 1.
    assert [batch.shape[0] for batch in seen] == [3, 1]
    assert torch.equal(seen[0], normalize_pixels(torch.cat(images[:2])))
    assert torch.equal(seen[1], normalize_pixels(images[2]))
    for key, tiles in zip("abc", images, strict=True):
        expected = normalize_pixels(tiles).reshape(tiles.shape[0], 1, -1)[:, :, :4] * 2
        assert torch.equal(result[key], expected.reshape(-1, 4))
    assert encoder.take_batch_sizes() == [2, 1]
