"""The server's flags: the engine's plus HTTP, multimodal and distributed ones (LightLLM names
and defaults where LightLLM has the flag)."""

from __future__ import annotations

from dataclasses import dataclass

from ocula.config import EngineArgs, option


@dataclass
class ServerArgs(EngineArgs):
    host: str = option("127.0.0.1", "Address the HTTP server listens on.")
    port: int = option(8000, "HTTP port.")
    model_name: str | None = option(
        None,
        "Model name reported by /v1/models and accepted in requests; default: the folder name.",
    )
    allow_local_media: bool = option(
        False, "Let image URLs point at loopback and private addresses."
    )
    log_stats_interval: float = option(10.0, "Seconds between throughput log lines (0: never).")
    max_waiting_requests: int = option(
        1024, "Requests that may wait for a slot; beyond that new ones get 503 with Retry-After."
    )
    max_request_body_mb: float = option(64.0, "Largest HTTP request body, in MiB (413 beyond).")
    request_body_timeout_s: float = option(
        30.0, "Longest wait for the next piece of a request body (408 beyond)."
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
        if not self.request_body_timeout_s > 0:
            raise ValueError(
                f"--request_body_timeout_s must be positive, got {self.request_body_timeout_s}"
            )
        if self.max_request_body_mb <= 0:
            raise ValueError(
                f"--max_request_body_mb must be positive, got {self.max_request_body_mb}"
            )
