"""Tiny random-weight checkpoints and a tokenizer, built on the fly (nothing is downloaded).

- `make_tokenizer(out_dir)`: a byte-level BPE (601 tokens) trained in well under a second, with
  ChatML special tokens and chat template, saved with `save_pretrained`.
- `make_tiny_checkpoint(arch, out_dir, **config_overrides)`: a tokenizer plus a 2-layer model
  (hidden 64, 4 heads, 2 KV heads) of arch "llama", "qwen2", "mistral" or "internlm2", saved as
  safetensors (`num_shards > 1` writes an index and several files).
- `internlm2_reference_llama(dir)`: the transformers LlamaForCausalLM that computes exactly what an
  InternLM2 checkpoint written here computes (transformers has no InternLM2 without remote code).

The configs declare no eos/bos/pad ids (the tokenizer does: eos `<|im_end|>`, pad `<|endoftext|>`),
so transformers' reference generation never stops early; pass `eos_token_id=...` as an override
to put one into config.json and generation_config.json.

Weights are drawn with a fixed seed and a larger spread than transformers' default init, with
random biases and norm weights, so that every parameter matters and greedy choices are decisive.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

ARCHES = ("llama", "qwen2", "mistral", "internlm2")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_SIZES: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}
WEIGHT_STD = 0.15

_CORPUS_TEXT = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches "
    "in the old library; servers stream tokens, caches remember prefixes, and images become "
    "embeddings. Numbers like 12, 345 and 6789 appear too! Why? Because tests need variety."
)
# Made-up words from these syllables give the BPE trainer enough distinct pairs to merge.
_SYLLABLE_TEXT = "ka lo mi ne ru ta shi vo pe zu ex ing tion er an qu bl st or ei"


def _training_corpus() -> list[str]:
    words = _CORPUS_TEXT.split()
    syllable_list = _SYLLABLE_TEXT.split()
    generator = torch.Generator().manual_seed(0)
    lines = []
    for _ in range(400):
        picks = torch.randint(len(words), (12,), generator=generator).tolist()
        lines.append(" ".join(words[i] for i in picks))
        syllables = torch.randint(len(syllable_list), (8, 3), generator=generator).tolist()
        lines.append(" ".join("".join(syllable_list[i] for i in word) for word in syllables))
    return lines


@cache
def _tokenizer_json() -> str:
    """The trained tokenizer, serialised (trained once per process; training is deterministic)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=601,  # odd, so vocab-parallel layers pad for TP sizes 2 and 4
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_corpus(), trainer=trainer)
    return tokenizer.to_str()


def make_tokenizer(out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Saves the test tokenizer into `out_dir` and returns it (eos <|im_end|>, pad <|endoftext|>)."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def _randomize(model: PreTrainedModel, seed: int) -> None:
    """Every weight ~ N(0, WEIGHT_STD); norm weights ~ 1 + N(0, 0.1); biases ~ N(0, 0.05)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name:
                param.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                param.copy_(0.05 * noise)
            else:
                param.copy_(WEIGHT_STD * noise)


def _hf_config(arch: str, vocab_size: int, overrides: dict[str, Any]) -> Any:
    settings = {**TINY_SIZES, "vocab_size": vocab_size, "bos_token_id": None, **overrides}
    settings.setdefault("eos_token_id", None)
    settings.setdefault("pad_token_id", None)
    if arch == "qwen2":
        return Qwen2Config(**settings)
    if arch == "mistral":
        settings.setdefault("sliding_window", None)
        return MistralConfig(**settings)
    return LlamaConfig(**settings)


_HF_CLASSES = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "mistral": MistralForCausalLM}


def _shard_and_save(state_dict: dict[str, torch.Tensor], out_dir: Path, num_shards: int) -> None:
    """Writes model.safetensors, or `num_shards` files plus model.safetensors.index.json."""
    tensors = {name: tensor.contiguous() for name, tensor in state_dict.items()}
    if num_shards <= 1:
        save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return
    names = sorted(tensors)
    weight_map = {}
    for shard in range(num_shards):
        file_name = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {name: tensors[name] for name in names[shard::num_shards]}
        save_file(part, str(out_dir / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file_name))
    total_size = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _hf_state_dict(model: PreTrainedModel, tied: bool) -> dict[str, torch.Tensor]:
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    if tied:
        state.pop("lm_head.weight", None)  # as save_pretrained does
    return state


def make_tiny_checkpoint(
    arch: str,
    out_dir: str | Path,
    num_shards: int = 1,
    seed: int = 0,
    **config_overrides: Any,
) -> Path:
    """Writes tokenizer, config and random weights of a tiny `arch` model into `out_dir`.

    `config_overrides` go into the transformers config (for internlm2: into its config.json,
    e.g. `rope_scaling={"type": "dynamic", "factor": 2.0}`, `bias=True`).
    """
    if arch not in ARCHES:
        raise ValueError(f"unknown arch {arch!r}; choose from {ARCHES}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_size = len(make_tokenizer(out_dir))
    if arch == "internlm2":
        _write_internlm2(out_dir, vocab_size, num_shards, seed, config_overrides)
        return out_dir
    torch.manual_seed(seed)
    config = _hf_config(arch, vocab_size, config_overrides)
    model = _HF_CLASSES[arch](config)
    _randomize(model, seed)
    tied = bool(config.tie_word_embeddings)
    model.save_pretrained(str(out_dir))  # config.json, generation_config.json, model.safetensors
    if num_shards > 1:
        (out_dir / "model.safetensors").unlink()
        _shard_and_save(_hf_state_dict(model, tied), out_dir, num_shards)
    return out_dir


# -- InternLM2 -------------------------------------------------------------------------------


# Llama module names -> InternLM2 module names (q/k/v are packed into wqkv separately).
_LLAMA_TO_INTERNLM2 = {
    "model.embed_tokens.": "model.tok_embeddings.",
    "self_attn.o_proj.": "attention.wo.",
    "mlp.gate_proj.": "feed_forward.w1.",
    "mlp.up_proj.": "feed_forward.w3.",
    "mlp.down_proj.": "feed_forward.w2.",
    "input_layernorm.": "attention_norm.",
    "post_attention_layernorm.": "ffn_norm.",
    "lm_head.": "output.",
}


def _rename(name: str, renames: dict[str, str]) -> str:
    for old, new in renames.items():
        name = name.replace(old, new)
    return name


def _internlm2_raw_config(vocab_size: int, overrides: dict[str, Any]) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "architectures": ["InternLM2ForCausalLM"],
        # As real InternLM2 checkpoints have it (never executed here): AutoTokenizer on this
        # folder needs trust_remote_code=False passed explicitly, or it asks whether to run it.
        "auto_map": {
            "AutoConfig": "configuration_internlm2.InternLM2Config",
            "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
        },
        "model_type": "internlm2",
        "bias": False,
        "hidden_act": "silu",
        "rope_theta": 10000,
        "rope_scaling": None,
        "torch_dtype": "float32",
        "vocab_size": vocab_size,
        **TINY_SIZES,
    }
    raw.update(overrides)
    return raw


def _llama_config_for_internlm2(raw: dict[str, Any]) -> LlamaConfig:
    """The transformers Llama config that computes what the InternLM2 config describes."""
    scaling = raw.get("rope_scaling")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(raw["rope_theta"])}
    if scaling:
        rope.update(rope_type=scaling["type"], factor=float(scaling["factor"]))
    sizes = {key: raw[key] for key in TINY_SIZES}
    return LlamaConfig(
        **sizes,
        vocab_size=raw["vocab_size"],
        hidden_act=raw["hidden_act"],
        rope_parameters=rope,
        attention_bias=raw["bias"],
        mlp_bias=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def _internlm2_names(llama_state: dict[str, torch.Tensor], config: LlamaConfig) -> dict:
    """Llama state dict -> InternLM2 state dict (q/k/v packed per KV group into wqkv)."""
    head_dim = config.hidden_size // config.num_attention_heads
    kv_heads = config.num_key_value_heads
    q_per_kv = config.num_attention_heads // kv_heads
    out = {}
    for name, tensor in llama_state.items():
        if any(f"self_attn.{p}_proj." in name for p in "qkv"):
            continue
        out[_rename(name, _LLAMA_TO_INTERNLM2)] = tensor
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}.self_attn."
        for kind in ("weight", "bias"):
            if f"{prefix}q_proj.{kind}" not in llama_state:
                continue
            q, k, v = (llama_state[f"{prefix}{p}_proj.{kind}"] for p in "qkv")
            tail = q.shape[1:]
            groups = torch.cat(
                [
                    q.reshape(kv_heads, q_per_kv, head_dim, *tail),
                    k.reshape(kv_heads, 1, head_dim, *tail),
                    v.reshape(kv_heads, 1, head_dim, *tail),
                ],
                dim=1,
            )
            out[f"model.layers.{layer}.attention.wqkv.{kind}"] = groups.reshape(-1, *tail)
    return out


def _write_internlm2(
    out_dir: Path, vocab_size: int, num_shards: int, seed: int, overrides: dict[str, Any]
) -> None:
    raw = _internlm2_raw_config(vocab_size, overrides)
    torch.manual_seed(seed)
    llama_config = _llama_config_for_internlm2(raw)
    llama = LlamaForCausalLM(llama_config)
    _randomize(llama, seed)
    state = _hf_state_dict(llama, bool(raw["tie_word_embeddings"]))
    _shard_and_save(_internlm2_names(state, llama_config), out_dir, num_shards)
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2))


def internlm2_reference_llama(checkpoint_dir: str | Path) -> LlamaForCausalLM:
    """A transformers Llama holding the weights of an InternLM2 checkpoint written here."""
    checkpoint_dir = Path(checkpoint_dir)
    raw = json.loads((checkpoint_dir / "config.json").read_text())
    config = _llama_config_for_internlm2(raw)
    head_dim = config.hidden_size // config.num_attention_heads
    kv_heads = config.num_key_value_heads
    q_per_kv = config.num_attention_heads // kv_heads
    internlm2: dict[str, torch.Tensor] = {}
    for path in sorted(checkpoint_dir.glob("*.safetensors")):
        internlm2.update(load_file(str(path)))
    internlm2_to_llama = {new: old for old, new in _LLAMA_TO_INTERNLM2.items()}
    llama_state = {}
    for name, tensor in internlm2.items():
        if ".attention.wqkv." in name:
            kind = name.rsplit(".", 1)[1]
            prefix = name.split("attention.wqkv.")[0] + "self_attn."
            groups = tensor.reshape(kv_heads, q_per_kv + 2, head_dim, *tensor.shape[1:])
            tail = tensor.shape[1:]
            llama_state[f"{prefix}q_proj.{kind}"] = groups[:, :q_per_kv].reshape(-1, *tail)
            llama_state[f"{prefix}k_proj.{kind}"] = groups[:, q_per_kv].reshape(-1, *tail)
            llama_state[f"{prefix}v_proj.{kind}"] = groups[:, q_per_kv + 1].reshape(-1, *tail)
            continue
        llama_state[_rename(name, internlm2_to_llama)] = tensor
    model = LlamaForCausalLM(config)
    model.load_state_dict(llama_state, strict=not config.tie_word_embeddings)
    model.tie_weights()
    return model.eval()
