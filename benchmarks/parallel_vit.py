"""ViT throughput of one layout: images per second of the vision-encoder stage, on rank 0.

Requests of one distinct 448 x 448 image (one tile) and a short question each, max_new_tokens
1, are all added at once, after a warm-up batch of the same shape with other images (it
captures the ViT's CUDA graphs for the same batch sizes). `EncodeTimer` times every call of
`ImageEncoder.encode` on rank 0, synchronized before and after: the ViT forwards in batches of
--visual_infer_batch_size (tensor parallel inside a ViT group) and the broadcasts that give
every rank every image's embeddings (data parallel over ViT groups). It leaves out what every
layout does alike on rank 0's CPU (JPEG decoding, tiling) and the pixels' trip in the step
plan. The batch's time from its first step to its last first token is kept beside it: LLM
prefill included, which dominates it.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from benchmarks.common import Deadline, log, sync
from benchmarks.engine_driver import add_to_core, finish, step_until_all_sampled
from benchmarks.workloads import image_prompt

FULL = {"requests": 64, "words": 24}
TINY = {"requests": 8, "words": 12}
# Far from the other parts' image seeds: no part finds another's embeddings in the image cache.
WARMUP_SEED, SEED = 3000, 5000


class EncodeTimer:
    """Wall time of every vision-encoder stage on rank 0, from the step's encoder inputs to
    every embedding on this rank. Installed on this process's `ImageEncoder` instance only
    (the other ranks run the class's method) and removed by `close`."""

    def __init__(self, engine: Any) -> None:
        runner = engine.core.runner
        if runner.image_encoder is None:
            raise RuntimeError(f"{engine.model_dir} has no vision encoder")
        self.encoder = runner.image_encoder
        self.device = runner.device
        self.seconds = 0.0
        self.images = 0
        self.tiles = 0
        self.calls = 0
        self._encode = self.encoder.encode
        self.encoder.encode = self._timed  # type: ignore[method-assign]

    def _timed(self, inputs: list[Any]) -> dict[str, torch.Tensor]:
        sync(self.device)
        start = time.perf_counter()
        result = self._encode(inputs)
        sync(self.device)
        self.seconds += time.perf_counter() - start
        self.images += len(inputs)
        self.tiles += sum(item.pixel_values.shape[0] for item in inputs)
        self.calls += 1
        return result

    def close(self) -> None:
        del self.encoder.encode  # the class's method again


def _vit_run(engine: Any, seed: int, sizes: dict[str, int], deadline: Deadline) -> dict[str, Any]:
    core = engine.core
    device = core.runner.device
    prompts = [image_prompt(seed + i, sizes["words"]) for i in range(sizes["requests"])]
    batch = add_to_core(engine, prompts, 1)  # tokenized here, not timed
    core.take_vit_batch_sizes()
    timer = EncodeTimer(engine)
    try:
        sync(device)
        start = time.perf_counter()
        steps = step_until_all_sampled(core, batch, deadline)
        sync(device)
        ttft = time.perf_counter() - start
    finally:
        timer.close()
        finish(core, batch)
    return {
        "images": timer.images,
        "tiles": timer.tiles,
        "encode_calls": timer.calls,
        "encode_seconds": timer.seconds,
        "images_per_s": timer.images / timer.seconds if timer.seconds else None,
        "batch_ttft_seconds": ttft,
        "images_per_s_batch_ttft": timer.images / ttft,
        "steps": steps,
        "vit_batch_sizes_rank0_group": core.take_vit_batch_sizes(),
    }


def vit(engine: Any, tiny: bool, deadline: Deadline) -> dict[str, Any]:
    """A warm-up batch (it captures the ViT graphs of the same batch shapes), then the timed
    one, with other images."""
    sizes = TINY if tiny else FULL
    warmup = _vit_run(engine, WARMUP_SEED, sizes, deadline)
    result = {**_vit_run(engine, SEED, sizes, deadline), "warmup": warmup}
    log(
        f"vit: {result['images_per_s'] or 0:.1f} images/s in the encode stage, batch TTFT "
        f"{result['batch_ttft_seconds']:.3f} s"
    )
    return result
