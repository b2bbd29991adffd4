"""Which Triton kernels compile inside a block (`knobs.runtime.jit_cache_hook`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def recorded_compiles() -> Iterator[list[str]]:
    """Yields a list that collects the name and specialization of every kernel compiled in the
    block (each still compiles as usual); the previous hook is restored after it."""
    from triton import knobs

    compiled: list[str] = []

    def record(*, repr: str, **_: object) -> bool:
        compiled.append(repr)
        return False  # compile as usual

    previous = knobs.runtime.jit_cache_hook
    knobs.runtime.jit_cache_hook = record
    try:
        yield compiled
    finally:
        knobs.runtime.jit_cache_hook = previous
