"""The engine in one process: tokenizer and output processing in front of an `EngineCore`.

This is what the offline `LLM` API drives, and the same core the server runs.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any

from ocula.config import EngineArgs
from ocula.engine.engine_core import EngineCore, EngineStats, RequestRejectedError
from ocula.engine.model_setup import ModelSetup, resolve_model
from ocula.engine.output_processor import (
    RequestGroup,
    SequenceStream,
    child_request_id,
    fan_out,
)
from ocula.engine.outputs import RequestOutput
from ocula.engine.request import ImageSpan, Request
from ocula.multimodal.image_loading import (
    ImageError,
    ImageLimits,
)
from ocula.multimodal.image_processing import MAX_REQUEST_TILES
from ocula.multimodal.internvl_prompt import VisionSpec, build_image_prompt
from ocula.multimodal.loaded_images import LoadedImage
from ocula.sampling.params import SamplingParams

logger = logging.getLogger(__name__)

# A prompt is text, token ids, or {"prompt": text with <image> or <img></img> tags,
# "images": [encoded image bytes, in tag order], "image_max_patch_num": optional tile cap}.
Prompt = str | list[int] | dict[str, Any]

# Threads that decode a batch of prompts' images (`add_requests`).
DECODE_THREADS = min(8, os.cpu_count() or 1)


class LLMEngine:
    def __init__(
        self, args: EngineArgs, setup: ModelSetup | None = None, core: EngineCore | None = None
    ) -> None:
        """Loads the model of `args` into a single-process core; or, given `setup` and the
        `core` built from it elsewhere (with tensor-parallel followers, say), fronts that core."""
        args.validate()
        if (setup is None) != (core is None):
            raise ValueError("a prebuilt core comes with the setup it was built from")
        self.args = args
        if setup is None:
            setup = resolve_model(args)
        self.model_dir = setup.model_dir
        self.model_config = setup.model_config
        self.generation_config = setup.generation_config
        self.tokenizer = setup.load_tokenizer(args)
        self.eos_token_ids = setup.eos_token_ids(args, self.tokenizer)
        if core is None:
            logger.info("loading %s on %s in %s", setup.model_dir, setup.device, setup.dtype)
            core = EngineCore(args, setup)
        self.core = core
        self.vision: VisionSpec | None = None
        if self.core.is_multimodal:
            self.vision = VisionSpec.for_model(self.model_config, self.tokenizer)
        self._groups: dict[str, RequestGroup] = {}
        self._sequences: dict[str, tuple[RequestGroup, SequenceStream]] = {}
        self._decode_pool: ThreadPoolExecutor | None = None  # see `add_requests`

    # -- requests -----------------------------------------------------------------------------
    def resolve_params(self, params: SamplingParams | None) -> SamplingParams:
        params = params or SamplingParams()
        params.validate(self.model_config.vocab_size)
        return params.with_model_defaults(self.generation_config)

    def tokenize(
        self, prompt: Prompt, decoded: list[LoadedImage] | None = None
    ) -> tuple[list[int], list[ImageSpan]]:
        """Token ids of a prompt, and the spans of its images (multimodal prompts). `decoded`:
        the prompt's images already decoded (by `_start_decoding`'s threads), else decoded here."""
        if isinstance(prompt, dict):
            return self._tokenize_with_images(prompt, decoded)
        return self._tokenize_text(prompt), []

    def _tokenize_with_images(
        self, prompt: dict[str, Any], decoded: list[LoadedImage] | None
    ) -> tuple[list[int], list[ImageSpan]]:
        self._check_multimodal_prompt(prompt)
        images = decoded if decoded is not None else self._decode_images(prompt)
        return build_image_prompt(
            prompt["prompt"],
            images,
            self.vision,
            self.tokenizer,
            prompt.get("image_max_patch_num"),
        )

    def _check_multimodal_prompt(self, prompt: dict[str, Any]) -> None:
        if self.vision is None:
            raise ValueError(f"{self.model_dir.name} has no vision encoder: it cannot take images")
        unknown = set(prompt) - {"prompt", "images", "image_max_patch_num"}
        if unknown or not isinstance(prompt.get("prompt"), str):
            raise ValueError(
                "a multimodal prompt is {'prompt': str, 'images': [bytes], "
                f"'image_max_patch_num': int}}; got keys {sorted(prompt)}"
            )
        max_tiles = prompt.get("image_max_patch_num")
        if max_tiles is not None and (
            isinstance(max_tiles, bool)
            or not isinstance(max_tiles, int)
            or not 0 <= max_tiles <= MAX_REQUEST_TILES
        ):
            raise ValueError(
                f"image_max_patch_num must be an int in [0, {MAX_REQUEST_TILES}] (0: the "
                f"checkpoint's cap), got {max_tiles!r}"
            )

    @staticmethod
    def _decode_images(prompt: dict[str, Any]) -> list[LoadedImage]:
        limits = ImageLimits()
        images = []
        for index, data in enumerate(prompt.get("images", [])):
            try:
                images.append(LoadedImage.decoded(data, limits))
            except ImageError as error:
                raise ValueError(f"image {index}: {error.message}") from None
        return images

    def _start_decoding(self, prompts: list[Prompt]) -> list[list[Future] | None]:
        """Starts decoding every multimodal prompt's images in the engine's decode threads (PIL
        decodes without the GIL) when there are several in all: one Future per image, None
        for other prompts, and for every prompt when there are fewer (`tokenize` decodes)."""
        multimodal = [prompt if isinstance(prompt, dict) else None for prompt in prompts]
        count = sum(
            len(prompt.get("images", [])) if isinstance(prompt.get("images"), list) else 0
            for prompt in multimodal
            if prompt is not None
        )
        if count < 2:
            return [None] * len(prompts)
        if self._decode_pool is None:
            self._decode_pool = ThreadPoolExecutor(DECODE_THREADS, "ocula-image-decode")
        decode = partial(LoadedImage.decoded, limits=ImageLimits())
        return [
            [self._decode_pool.submit(decode, data) for data in prompt["images"]]
            if prompt is not None and isinstance(prompt.get("images"), list)
            else None
            for prompt in multimodal
        ]

    def _tokenize_text(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {vocab}); got {bad[:5]}")
        return list(prompt)

    def add_request(
        self, request_id: str, prompt: Prompt, params: SamplingParams | None = None
    ) -> None:
        """Queues a prompt. Raises ValueError (RequestRejectedError included) for a bad request."""
        self.add_requests([(request_id, prompt, params)])

    def add_requests(self, requests: Sequence[tuple[str, Prompt, SamplingParams | None]]) -> None:
        """Queues (request id, prompt, params) triples in order, all or none: a bad one raises
        ValueError (RequestRejectedError included; "prompt i: ..." when there are several) and
        leaves none of them queued. The images of all prompts are decoded (and so checked) in
        parallel first."""
        ids = [request_id for request_id, _, _ in requests]
        for request_id in ids:
            if request_id in self._groups:
                raise ValueError(f"request id {request_id!r} is already in use")
        if len(set(ids)) != len(ids):
            raise ValueError("request ids repeat within one call")
        params_list = [self.resolve_params(params) for _, _, params in requests]
        prompts = [prompt for _, prompt, _ in requests]
        decoding = self._start_decoding(prompts)
        many = len(requests) > 1
        where = [f"prompt {index}: " if many else "" for index in range(len(requests))]
        tokenized = []
        try:
            for index, (prompt, futures) in enumerate(zip(prompts, decoding, strict=True)):
                try:
                    decoded = _collect_images(futures) if futures is not None else None
                    tokenized.append(self.tokenize(prompt, decoded))
                except ValueError as error:
                    raise ValueError(f"{where[index]}{error}") from None
        finally:
            for future in itertools.chain.from_iterable(f for f in decoding if f is not None):
                future.cancel()  # after an error: the decodes not started yet
        queued = []
        try:
            for index, (request_id, prompt, params, (prompt_ids, spans)) in enumerate(
                zip(ids, prompts, params_list, tokenized, strict=True)
            ):
                try:
                    self._queue(request_id, prompt, params, prompt_ids, spans)
                except RequestRejectedError as error:
                    raise RequestRejectedError(f"{where[index]}{error}") from None
                queued.append(request_id)
        except Exception:
            for request_id in queued:
                self.abort_request(request_id)
            raise

    def _queue(
        self,
        request_id: str,
        prompt: Prompt,
        params: SamplingParams,
        prompt_ids: list[int],
        images: list[ImageSpan],
    ) -> None:
        group = RequestGroup(request_id, prompt if isinstance(prompt, str) else None, prompt_ids)
        children = []
        for index, (child_id, child_params) in enumerate(fan_out(request_id, params)):
            children.append(
                Request(child_id, prompt_ids, child_params, self.eos_token_ids, images=images)
            )
            # Text is read once a request has finished (`step`): detokenized then, in one go.
            stream = SequenceStream(
                index, self.tokenizer, prompt_ids, child_params, final_only=True
            )
            group.sequences.append(stream)
        added = []
        try:
            for child in children:
                self.core.add_request(child)
                added.append(child)
        except ValueError:
            for child in added:
                self.core.abort_request(child.request_id)
            raise
        self._groups[request_id] = group
        for child, stream in zip(children, group.sequences, strict=True):
            self._sequences[child.request_id] = (group, stream)

    def abort_request(self, request_id: str) -> None:
        group = self._groups.pop(request_id, None)
        if group is None:
            return
        for index, stream in enumerate(group.sequences):
            child_id = child_request_id(request_id, index, len(group.sequences))
            self.core.abort_request(child_id)
            self._sequences.pop(child_id, None)
            if not stream.finished:
                stream.abort()

    def has_unfinished_requests(self) -> bool:
        return bool(self._groups)

    # -- stepping -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Runs one engine step; returns the outputs of the requests that finished in it."""
        finished: list[RequestOutput] = []
        updates = self.core.step()
        self.core.release_finished()  # nothing waits for the updates in-process
        for update in updates:
            entry = self._sequences.get(update.request_id)
            if entry is None:
                continue
            group, stream = entry
            stream.apply(update)
            if not stream.finished:
                continue
            del self._sequences[update.request_id]
            if update.finish_reason is None:  # a stop string ended it: the core still runs it
                self.core.abort_request(update.request_id)
            if group.finished:
                del self._groups[group.request_id]
                finished.append(group.output())
        return finished

    def stats(self) -> EngineStats:
        return self.core.stats()


def _collect_images(futures: list[Future]) -> list[LoadedImage]:
    """The decoded images, in order; the first ImageError as ValueError("image i: ...")."""
    images = []
    for index, future in enumerate(futures):
        try:
            images.append(future.result())
        except ImageError as error:
            raise ValueError(f"image {index}: {error.message}") from None
    return images
