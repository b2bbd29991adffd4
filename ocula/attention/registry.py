"""The attention backends by name, as "module:attribute" strings imported on first use.

Kept free of torch so that the flag parser (`ocula.config` validates `--attention_backend`)
does not import it: the server parses its flags and starts the engine process before the front
imports anything heavy (`ocula.server.engine_launch`).
"""

from __future__ import annotations

ATTENTION_BACKENDS: dict[str, str] = {
    "reference": "ocula.layers.attention:ReferenceBackend",
    "triton": "ocula.attention.triton_backend:TritonBackend",
}
