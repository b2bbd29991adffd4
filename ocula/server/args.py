"""The server's flags: the engine's plus HTTP, multimodal and distributed ones (LightLLM names
and defaults where LightLLM has the flag)."""

from __future__ import annotations

from dataclasses import dataclass

from ocula.config import EngineArgs, option
from ocula.server.idle_wait import IDLE_WAIT_CHOICES
from ocula.server.lightllm_flags import LightLLMTuningFlags


@dataclass
class ServerArgs(EngineArgs, LightLLMTuningFlags):
    host: str = option("127.0.0.1", "Address the HTTP server listens on.")
    port: int = option(8000, "HTTP port.")
    model_name: str | None = option(
        None,
        "Model name reported by /v1/models and accepted in requests; default: the folder name.",
    )
    allow_local_media: bool = option(
        False, "Let image URLs point at loopback and private addresses."
    )
    api_key: str | None = option(
        None, "Key the OpenAI routes (/v1/...) require as `Authorization: Bearer <key>`."
    )
    allowed_origins: list[str] = option(
        [],
        "Origins browsers may call the server from (CORS), e.g. '*'; none by default.",
        nargs="*",
    )
    log_stats_interval: float = option(10.0, "Seconds between throughput log lines (0: never).")
    max_waiting_requests: int = option(
        1024, "Requests that may wait for a slot; beyond that new ones get 503 with Retry-After."
    )
    max_request_body_mb: float = option(64.0, "Largest HTTP request body, in MiB (413 beyond).")
    request_body_timeout_s: float = option(
        30.0,
        "Longest wait for the next piece of a request body, and for a request's headers from "
        "the connection's start or the request's first byte (408 beyond).",
    )
    engine_stall_timeout_s: float = option(
        100.0,
        "Seconds the engine may send nothing while requests wait on it before /health reports "
        "it unhealthy (LightLLM's HEALTH_TIMEOUT default; 0: never).",
    )
    return_all_prompt_logprobs: bool = option(
        False,
        "LightLLM's perplexity mode: every /generate answer also holds its prompt's token ids and "
        "each prompt token's logprob (such requests compute their whole prompt).",
    )
    disable_log_stats: bool = option(False, "No throughput log lines (as --log_stats_interval 0).")
    # LightLLM's flags for what Ocula always does, or does one way only: accepted so that a
    # LightLLM launch command starts as it is, and checked where a value asks for more.
    use_dynamic_prompt_cache: bool = option(
        False,
        "LightLLM's switch for the prompt cache, which is on here unless "
        "--disable_dynamic_prompt_cache: accepted, changes nothing.",
    )
    enable_fa3: bool = option(
        False,
        "LightLLM's FlashAttention-3 switch: accepted; Ocula runs its own attention kernels.",
    )
    graph_max_len_in_batch: int | None = option(
        None,
        "LightLLM's longest context in a CUDA-graph batch: accepted; Ocula's decode graphs serve "
        "every context length.",
    )
    dp: int = option(1, "LightLLM's data-parallel degree of the language model: only 1 here.")
    httpserver_workers: int = option(1, "LightLLM's HTTP worker processes: only 1 here.")
    quant_type: str = option(
        "none", "LightLLM's weight quantization: only none here.", choices=("none",)
    )
    idle_wait: str = option(
        "sleep",
        "How the engine process and the front wait while idle: sleep (no CPU while idle), spin "
        "(poll without sleeping, one CPU core each, so that a request finds their caches warm), "
        "or auto: spin when the model runs on a GPU, sleep on a CPU device.",
        choices=IDLE_WAIT_CHOICES,
    )
    skip_server_warmup: bool = option(
        False,
        "Serve without first running one synthetic request (with an image on a vision model) "
        "through the engine; without it, the first real request pays every first use.",
    )

    def validate(self) -> None:
        super().validate()
        if not 0 < self.port < 65536:
            raise ValueError(f"--port must be in 1..65535, got {self.port}")
        if self.max_waiting_requests < 0:
            raise ValueError(
                f"--max_waiting_requests must be >= 0, got {self.max_waiting_requests}"
            )
        if not self.engine_stall_timeout_s >= 0:
            raise ValueError(
                f"--engine_stall_timeout_s must be >= 0, got {self.engine_stall_timeout_s}"
            )
        if not self.request_body_timeout_s > 0:
            raise ValueError(
                f"--request_body_timeout_s must be positive, got {self.request_body_timeout_s}"
            )
        for flag, value in (("--dp", self.dp), ("--httpserver_workers", self.httpserver_workers)):
            if value != 1:
                raise ValueError(f"{flag} {value} is not supported: Ocula runs one (leave it at 1)")
        if self.max_request_body_mb <= 0:
            raise ValueError(
                f"--max_request_body_mb must be positive, got {self.max_request_body_mb}"
            )
