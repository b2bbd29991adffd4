"""Messages from the engine process to the HTTP front."""

from __future__ import annotations

from dataclasses import dataclass

from ocula.engine.engine_core import EngineStats
from ocula.engine.outputs import TokenUpdate


@dataclass
class EngineReady:
    kv_capacity: int  # tokens the KV cache holds
    max_req_total_len: int  # effective limit: the flag capped by the model's context
    batch_max_tokens: int
    spins_when_idle: bool = False  # the engine polls without sleeping; the front should too


@dataclass
class StepOutputs:
    updates: list[TokenUpdate]
    stats: EngineStats
    vit_batch_sizes: list[int]  # images per ViT forward in this step


@dataclass
class RequestFailed:
    """The engine refused a request the front let through (the message is for the client)."""

    request_id: str
    message: str


@dataclass
class EngineFailed:
    """The engine hit an error it cannot recover from; the server must stop."""

    message: str
