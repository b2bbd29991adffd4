"""Messages from the HTTP front to the engine process (pickled over `engine_channel.py`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ocula.engine.request import ImageSpan
from ocula.sampling.params import SamplingParams


@dataclass
class AddRequest:
    request_id: str  # a child id when the front fans out n > 1
    prompt_token_ids: list[int]
    sampling_params: SamplingParams  # resolved against the model's defaults
    eos_token_ids: frozenset[int]
    # Bytes travel once (image_payloads.py); pixels never do.
    images: list[ImageSpan] = field(default_factory=list)


@dataclass
class AbortRequest:
    request_id: str


@dataclass
class Shutdown:
    """Finish nothing more and exit."""
