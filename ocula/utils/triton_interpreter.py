"""Triton's CPU interpreter (TRITON_INTERPRET=1) made to run the paged attention kernels.

Those kernels loop `for start in range(lo, hi, BLOCK)` to bounds read from device memory, as
compiled Triton allows. Triton 3.6's interpreter converts such a bound with
int(<1-element 1-d array>), which numpy >= 2.4 rejects; inside `runtime_loop_bounds()` it
converts the single element instead. Only the interpreter is touched (nothing when it is off),
and only inside the context. Used by the kernel tests and the CPU checks of the benchmarks.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def runtime_loop_bounds() -> Iterator[None]:
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor: type, scope: object) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda value: int(value.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch_lang_tensor
    try:
        yield
    finally:
        interpreter._patch_lang_tensor = original
