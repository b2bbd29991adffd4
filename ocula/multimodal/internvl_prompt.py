"""InternVL prompts: image tags become placeholder spans, and the spans become `ImageSpan`s.

In a prompt, each `<img></img>` (LightLLM's client) or `<image>` (InternVL's chat template)
stands for one image, in order. It becomes `<img>` + n × `<IMG_CONTEXT>` + `</img>`, where n is
the image's tiles × tokens per tile; the IMG_CONTEXT rows of the input embeddings are later
replaced by the image's embedding. The tile count comes from the image size alone, so no pixel
is touched here: a span carries the tiles its image was loaded with (`LoadedImage.tiles`, made
with this very tiling), else the engine tiles the bytes, and only when the embedding is not
cached.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from ocula import env
from ocula.engine.request import ImageSpan
from ocula.multimodal.image_processing import InternVLImageConfig, count_tiles, resolve_max_tiles
from ocula.multimodal.loaded_images import LoadedImage

_TAG = re.compile(r"<img></img>|<image>")


@dataclass(frozen=True)
class VisionSpec:
    """What the front needs to know about the model's vision side."""

    tiling: InternVLImageConfig  # max_num = the config's max_dynamic_patch
    tokens_per_tile: int
    context_token_id: int
    start_token: str
    end_token: str
    context_token: str

    @classmethod
    def for_model(cls, config: Any, tokenizer: Any) -> VisionSpec:
        """Raises ValueError when INTERNVL_IMAGE_LENGTH disagrees with the checkpoint."""
        expected = env.internvl_image_length()
        if expected != config.tokens_per_tile:
            raise ValueError(
                f"INTERNVL_IMAGE_LENGTH is {expected} but this checkpoint makes "
                f"{config.tokens_per_tile} tokens per tile ((image_size {config.image_size} / "
                f"patch {config.patch_size})^2 x downsample_ratio {config.downsample_ratio}^2); "
                f"set INTERNVL_IMAGE_LENGTH={config.tokens_per_tile} or leave it unset"
            )
        return cls(
            tiling_from_config(config),
            config.tokens_per_tile,
            config.image_token_id_for(tokenizer),
            config.image_start_token,
            config.image_end_token,
            config.image_context_token,
        )

    def tiling_for(self, requested_max_tiles: int | None) -> InternVLImageConfig:
        return tiling_for_request(self.tiling, requested_max_tiles)


def tiling_from_config(config: Any) -> InternVLImageConfig:
    """The checkpoint's tiling (an InternVLModelConfig's); max_num = its max_dynamic_patch."""
    return InternVLImageConfig(
        image_size=config.image_size,
        min_num=config.min_dynamic_patch,
        max_num=config.max_dynamic_patch,
        use_thumbnail=config.use_thumbnail,
        dynamic=config.dynamic_image_size,
    )


def tiling_for_request(
    base: InternVLImageConfig, requested_max_tiles: int | None
) -> InternVLImageConfig:
    """`base` with the tile cap a request gets: its own, else MAX_PATCH_NUM, else base's."""
    max_tiles = resolve_max_tiles(requested_max_tiles, env.max_patch_num(), base.max_num)
    return replace(base, max_num=max(max_tiles, base.min_num))


def default_tiles_per_image(config: Any) -> int:
    """Most tiles (thumbnail included) an image gets when its request sets no tile cap."""
    tiling = tiling_for_request(tiling_from_config(config), None)
    if not tiling.dynamic:
        return 1
    return tiling.max_num + (1 if tiling.use_thumbnail and tiling.max_num > 1 else 0)


def count_image_tags(text: str) -> int:
    return len(_TAG.findall(text))


def image_tags(text: str, num_images: int) -> list[re.Match[str]]:
    """The tags that stand for the request's images, in order: every `<img></img>` and
    `<image>`, except that a prompt without `<img></img>` may hold more `<image>` tags than
    its (one or more) images: the first ones stand for the images and the rest stay text, as
    InternVL's chat and LightLLM's InternVL tokenizer read them. Raises ValueError when the
    tags cannot match the images one to one."""
    tags = list(_TAG.finditer(text))
    if 0 < num_images < len(tags) and all(tag.group() == "<image>" for tag in tags):
        tags = tags[:num_images]
    if len(tags) != num_images:
        raise ValueError(
            f"the prompt has {len(tags)} image tag(s) (<img></img> or <image>) but the request "
            f"has {num_images} image(s); they must match one to one"
        )
    return tags


def check_image_tags(text: str, num_images: int) -> None:
    """Raises ValueError unless `text` has one image tag per image (`image_tags`)."""
    image_tags(text, num_images)


def image_cache_key(md5: str, size: tuple[int, int], tiling: InternVLImageConfig) -> str:
    """The bytes' MD5 plus the image's size and every tiling parameter that changes the
    embedding. The size keeps two images whose MD5s collide (a forged collision is cheap) from
    sharing an embedding of another length than their placeholder spans."""
    return (
        f"{md5}:{size[0]}x{size[1]}:{tiling.image_size}:{tiling.min_num}-{tiling.max_num}:"
        f"{int(tiling.use_thumbnail)}{int(tiling.dynamic)}"
    )


def build_image_prompt(
    text: str,
    images: list[LoadedImage],
    spec: VisionSpec,
    tokenizer: Any,
    requested_max_tiles: int | None = None,
    add_special_tokens: bool = True,
) -> tuple[list[int], list[ImageSpan]]:
    """Token ids of `text` with its image tags expanded, and one ImageSpan per image.
    Raises ValueError when tags and images do not match one to one."""
    compact = tokenize_compact(text, len(images), spec, tokenizer, add_special_tokens)
    return expand_images(compact, images, spec, requested_max_tiles)


@dataclass(frozen=True)
class CompactPrompt:
    """A prompt tokenized with one placeholder token per image: the ids, and where each
    image's placeholder is."""

    ids: list[int]
    placeholders: list[int]


def tokenize_compact(
    text: str, num_images: int, spec: VisionSpec, tokenizer: Any, add_special_tokens: bool = True
) -> CompactPrompt:
    """`text` tokenized with each image tag as <img>, ONE placeholder, </img>: what the images'
    sizes do not change, so it can be done while they load. Raises ValueError when the tags are
    not `num_images`, or when the text holds placeholder tokens of its own."""
    tags = image_tags(text, num_images)
    # The placeholder's token is repeated after tokenizing (`expand_images`). Same ids as
    # tokenizing the fully expanded text: the tokenizer splits its input at added tokens before
    # anything else, so the text around a run of placeholders is tokenized alone whatever the
    # run's length; but tokenizing 3,328 placeholders (12 tiles and a thumbnail) took 6 ms of
    # the front's event loop on 2 CPU cores.
    placeholder = spec.start_token + spec.context_token + spec.end_token
    pieces, end = [], 0
    for tag in tags:
        pieces += [text[end : tag.start()], placeholder]
        end = tag.end()
    expanded = "".join(pieces) + text[end:]
    ids = tokenizer.encode(expanded, add_special_tokens=add_special_tokens)
    runs = _runs_of(ids, spec.context_token_id)
    if [length for _, length in runs] != [1] * num_images:
        raise ValueError(
            "the prompt's text contains image placeholder tokens of its own; "
            f"write images only as <img></img> or <image> (found {len(runs)} spans for "
            f"{num_images} images)"
        )
    return CompactPrompt(ids, [position for position, _ in runs])


def expand_images(
    compact: CompactPrompt,
    images: list[LoadedImage],
    spec: VisionSpec,
    requested_max_tiles: int | None = None,
) -> tuple[list[int], list[ImageSpan]]:
    """The prompt's token ids with each placeholder repeated for its image's tiles x tokens per
    tile, and the images' spans (`images` in placeholder order)."""
    if len(images) != len(compact.placeholders):
        raise ValueError(
            f"{len(images)} images for a prompt of {len(compact.placeholders)} placeholders"
        )
    tiling = spec.tiling_for(requested_max_tiles)
    lengths = [count_tiles(*img.size, tiling) * spec.tokens_per_tile for img in images]
    token_ids: list[int] = []
    offsets = []
    previous = 0
    for position, length in zip(compact.placeholders, lengths, strict=True):
        token_ids += compact.ids[previous:position]
        offsets.append(len(token_ids))
        token_ids += [spec.context_token_id] * length
        previous = position + 1
    token_ids += compact.ids[previous:]
    spans = [
        ImageSpan(
            image_cache_key(img.md5, img.size, tiling),
            offset,
            length,
            img.data,
            tiling=tiling,
            image_base64=img.base64,
            pixel_values=img.tiles if img.tiled_with == tiling else None,
            payload_key=img.sha256,
        )
        for img, offset, length in zip(images, offsets, lengths, strict=True)
    ]
    return token_ids, spans


def _runs_of(token_ids: list[int], token_id: int) -> list[tuple[int, int]]:
    """(offset, length) of each maximal run of `token_id`, in order."""
    runs = []
    start = None
    for i, token in enumerate([*token_ids, -1]):
        if token == token_id and start is None:
            start = i
        elif token != token_id and start is not None:
            runs.append((start, i - start))
            start = None
    return runs
