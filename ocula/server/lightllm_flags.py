"""LightLLM launch flags that tune how LightLLM itself runs (its scheduler's knobs, kernel
backends, ports and GPUs of its processes, monitoring): accepted, so that a LightLLM launch
command starts as it is, and without effect here, where the same job is done another way. None
of them changes what a request returns. A flag set to anything but LightLLM's default is named
in one log line at start-up (`ignored_flags_note`).

LightLLM's flags that change outputs or add features Ocula lacks (quantized KV, constrained
decoding backends, tool-call and reasoning parsers, prefill/decode disaggregation, speculative
decoding, `--use_tgi_api`) are not accepted: the start stops with a message naming the flag.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ocula.config import option

_SCHEDULER = "Ocula's scheduler admits by KV room every step"
_KERNELS = "Ocula runs its own Triton kernels"
_VISION = "the ViT runs on the --tp ranks' GPUs (--visual_dp x --visual_tp)"
_PROCESSES = "Ocula's processes talk over its own channel"
_GRAPHS = "Ocula captures decode graphs for every batch up to --graph_max_batch_size"
_ATTENTION = ("auto", "triton", "fa3", "flashinfer")
_MONITOR = "Ocula serves /metrics for Prometheus to scrape; nothing is pushed"
_ONLY = "the only value here"


def _accepted(default: Any, what: str, why: str, **argparse_kwargs: Any) -> Any:
    return option(default, f"LightLLM's {what}: accepted, no effect ({why}).", **argparse_kwargs)


@dataclass
class LightLLMTuningFlags:
    router_token_ratio: float | None = _accepted(
        None, "KV share where admission turns cautious", _SCHEDULER
    )
    router_max_wait_tokens: int = _accepted(1, "decode steps between admissions", _SCHEDULER)
    disable_aggressive_schedule: bool = _accepted(False, "no prefill between decodes", _SCHEDULER)
    schedule_time_interval: float = _accepted(0.03, "scheduler period in seconds", _SCHEDULER)
    llm_prefill_att_backend: list[str] = _accepted(
        ["auto"], "prefill attention kernel", _KERNELS, choices=_ATTENTION
    )
    llm_decode_att_backend: list[str] = _accepted(
        ["auto"], "decode attention kernel", _KERNELS, choices=_ATTENTION
    )
    vit_att_backend: list[str] = _accepted(
        ["auto"],
        "ViT attention kernel",
        _KERNELS,
        choices=("auto", "triton", "fa3", "sdpa", "xformers"),
    )
    sampling_backend: str = _accepted(
        "triton", "sampling kernel", _KERNELS, choices=("triton", "sglang_kernel")
    )
    penalty_counter_mode: str = _accepted(
        "gpu_counter",
        "penalty counters' place",
        "Ocula counts the tokens per step",
        choices=("cpu_counter", "pin_mem_counter", "gpu_counter"),
    )
    disable_custom_allreduce: bool = _accepted(False, "NCCL all-reduce", "Ocula uses NCCL")
    enable_custom_allgather: bool = _accepted(False, "custom all-gather", "Ocula uses NCCL")
    enable_prefill_cudagraph: bool = _accepted(
        False, "prefill CUDA graphs", "Ocula graphs short prefill chunks piece by piece"
    )
    prefll_cudagraph_max_handle_token: int = _accepted(  # sic: LightLLM's spelling
        512, "largest prefill graph", "Ocula graphs short prefill chunks piece by piece"
    )
    graph_split_batch_size: int = _accepted(32, "graph batch step boundary", _GRAPHS)
    graph_grow_step_size: int = _accepted(16, "graph batch step", _GRAPHS)
    visual_gpu_ids: list[int] | None = _accepted(None, "ViT GPUs", _VISION)
    visual_nccl_ports: list[int] | None = _accepted(None, "ViT NCCL ports", _VISION)
    visual_send_batch_size: int = _accepted(
        1, "embeddings sent per batch", "embeddings stay on the GPU that uses them"
    )
    enable_mps: bool = _accepted(False, "NVIDIA MPS for the ViT", _VISION)
    zmq_mode: str = _accepted("ipc:///tmp/", "ZeroMQ transport", _PROCESSES)
    multinode_httpmanager_port: int = _accepted(12345, "multi-node HTTP port", _PROCESSES)
    multinode_router_gloo_port: int = _accepted(20001, "multi-node gloo port", _PROCESSES)
    disable_shm_warning: bool = _accepted(False, "/dev/shm warnings", _PROCESSES)
    detail_log: bool = _accepted(False, "per-request input log", "Ocula logs no request's content")
    health_monitor: bool = _accepted(
        False, "restarting monitor", "a dead engine stops the server: restart it from outside"
    )
    hardware_platform: str = _accepted(
        "cuda", "hardware", "Ocula runs on CUDA or the CPU", choices=("cuda",)
    )
    router_max_new_token_len: int = _accepted(
        1024, "new tokens the router assumes", "admission reserves what requests ask for"
    )
    dp_balancer: str = _accepted(
        "bs_balancer", "data-parallel balancer", "--dp is 1", choices=("round_robin", "bs_balancer")
    )
    embed_cache_storage_size: float = _accepted(
        4.0, "shared-memory embedding store, GB", "image embeddings live in --image_cache_gb"
    )
    # Their default (or only harmless) value; other values are refused by `choices`.
    run_mode: str = _accepted(
        "normal", "run mode", "no prefill/decode split here", choices=("normal",)
    )
    load_way: str = _accepted("HF", "weight format", _ONLY, choices=("HF",))
    output_constraint_mode: str = _accepted(
        "none", "constrained decoding backend", _ONLY, choices=("none",)
    )
    llm_kv_type: str = _accepted(
        "None", "KV cache type", _ONLY + ": the model's dtype", choices=("None",)
    )
    vit_quant_type: str = _accepted("none", "ViT quantization", _ONLY, choices=("none",))
    disable_audio: bool = _accepted(False, "audio switch", "these models take no audio")
    model_owner: str | None = _accepted(None, "model owner for /v1/models", "Ocula reports ocula")
    metric_gateway: str | None = _accepted(None, "metrics push gateway", _MONITOR)
    job_name: str = _accepted("lightllm", "monitor job name", _MONITOR)
    grouping_key: list[str] = _accepted(
        [], "monitor grouping key=value", _MONITOR, action="append", nargs=None
    )
    push_interval: int = _accepted(10, "metrics push interval", _MONITOR)
    enable_monitor_auth: bool = _accepted(False, "push gateway authentication", _MONITOR)


def ignored_flags_note(args: LightLLMTuningFlags) -> str | None:
    """One line naming the LightLLM tuning flags set to anything but LightLLM's default, or None
    when none is."""
    changed = [
        f"--{flag.name}"
        for flag in dataclasses.fields(LightLLMTuningFlags)
        if getattr(args, flag.name) != _default_of(flag)
    ]
    if not changed:
        return None
    return f"LightLLM flags accepted without effect here (see --help): {', '.join(changed)}"


def _default_of(flag: dataclasses.Field) -> Any:
    if flag.default_factory is not dataclasses.MISSING:
        return flag.default_factory()
    return flag.default
