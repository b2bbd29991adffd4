"""Cheaper device-function calls in Triton's interpreter, for the CPU test runs.

Triton 3.6's interpreter patches `triton.language` for the interpreter once per kernel launch
(`GridExecutor.__call__`, undone when the launch ends), and again on every call of a
`@triton.jit` helper from inside the kernel (`InterpretedFunction.__call__`). That second patch
walks `tl`, `tl.math` and `tl.tensor` with `inspect.getmembers` (~0.2 ms a call on the 2-core CI
machine) and installs the same interpreted builtins the launch already installed. That patch
is never undone (the launch's restore puts back only what the launch itself patched). Helpers
called in loops made it a third of the folded-norm decode tests' time.

`install()` skips that second patch when every language module the helper's globals name was
patched earlier in the same launch, by the launch itself or by an earlier helper call (whose
patch stays in place: `tl.sum`, from `triton.language.standard`, patches `triton.language.core`,
which the kernel's launch does not); the helper then runs exactly as it would after its own
patch. Only the interpreter version this was read against is touched.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
from typing import Any

INTERPRETER_VERSION = "3.6.0"

# The language modules patched so far in the launch in progress (None outside a launch).
_launch_languages: contextvars.ContextVar[set[int] | None] = contextvars.ContextVar(
    "launch_languages", default=None
)


@functools.cache
def _language_modules(fn: Any, tl: Any) -> frozenset[int]:
    """What `_patch_lang(fn)` would patch: the triton.language modules in fn's globals (asked
    on every helper call; a module's imports of them do not change)."""
    return frozenset(
        id(value)
        for value in fn.__globals__.values()
        if inspect.ismodule(value) and value in (tl, tl.core)
    )


def install() -> bool:
    """Patches the interpreter's helper calls; returns whether it did (False on another
    Triton version or where the interpreter's internals differ)."""
    try:
        import triton
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    grid_executor = getattr(interpreter, "GridExecutor", None)
    function = getattr(interpreter, "InterpretedFunction", None)
    if (
        triton.__version__ != INTERPRETER_VERSION
        or grid_executor is None
        or function is None
        or not hasattr(interpreter, "_patch_lang")
        or getattr(function, "_ocula_helper_calls", False)
    ):
        return False
    launch = grid_executor.__call__
    helper_call = function.__call__

    def launch_with_record(self: Any, *args: Any, **kwargs: Any) -> Any:
        token = _launch_languages.set(set(_language_modules(self.fn, tl)))
        try:
            return launch(self, *args, **kwargs)
        finally:
            _launch_languages.reset(token)

    def helper_call_without_repatch(self: Any, *args: Any, **kwargs: Any) -> Any:
        patched = _launch_languages.get()
        languages = _language_modules(self.fn, tl)
        if patched is None:
            return helper_call(self, *args, **kwargs)
        if not languages <= patched:
            patched.update(languages)  # helper_call's patch stays until the launch ends
            return helper_call(self, *args, **kwargs)
        rewritten = self.rewrite()
        try:
            return rewritten(*args, **kwargs)
        except Exception as error:
            raise interpreter.InterpreterError(repr(error)) from error

    grid_executor.__call__ = launch_with_record
    function.__call__ = helper_call_without_repatch
    function._ocula_helper_calls = True
    return True
