"""Ocula: a multimodal LLM serving engine.

`from ocula import LLM, SamplingParams` is the offline API. Heavy modules (torch, transformers)
load on first use, so `import ocula` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams"]

if TYPE_CHECKING:
    from ocula.entrypoints.llm import LLM
    from ocula.sampling.params import SamplingParams


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from ocula.entrypoints.llm import LLM

        return LLM
    if name == "SamplingParams":
        from ocula.sampling.params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'ocula' has no attribute {name!r}")
