"""Time marks inside the server's two processes, for `request_timeline`.

`install(directory)` wraps a few methods of the front and the engine so that each call (or
each call that carries a token, for the channel's messages) appends `time.perf_counter()` and
the mark's name to `directory/marks-<pid>.log`. `perf_counter` is CLOCK_MONOTONIC on Linux, one
clock for every process of the machine, so the client's send time and the marks of both
processes fall on one time line. Wrapping is all it does: the code under test is unchanged,
and nothing is installed unless `timeline_server` finds MARKS_DIR_ENV set.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

MARKS_DIR_ENV = "OCULA_TIMELINE_MARKS_DIR"


class MarkLog:
    def __init__(self, directory: str | Path) -> None:
        self._file = open(Path(directory) / f"marks-{os.getpid()}.log", "a", buffering=1)  # noqa: SIM115

    def mark(self, name: str) -> None:
        self._file.write(f"{time.perf_counter():.7f} {name}\n")


def _wrap(
    owner: Any,
    attribute: str,
    log: MarkLog,
    before: str | None = None,
    after: str | None = None,
    when: Callable[[tuple[Any, ...], Any], bool] | None = None,
) -> None:
    """Marks `before` and/or `after` each call of owner.attribute (a plain function or method);
    `when(args, result)` filters the calls marked (result is None before the call)."""
    original = getattr(owner, attribute)

    @functools.wraps(original)
    def marked(*args: Any, **kwargs: Any) -> Any:
        if before is not None and (when is None or when(args, None)):
            log.mark(before)
        result = original(*args, **kwargs)
        if after is not None and (when is None or when(args, result)):
            log.mark(after)
        return result

    setattr(owner, attribute, marked)


def _wrap_async(owner: Any, attribute: str, log: MarkLog, before: str, after: str) -> None:
    original = getattr(owner, attribute)

    @functools.wraps(original)
    async def marked(*args: Any, **kwargs: Any) -> Any:
        log.mark(before)
        result = await original(*args, **kwargs)
        log.mark(after)
        return result

    setattr(owner, attribute, marked)


def _wrap_async_iterator(owner: Any, attribute: str, log: MarkLog, each: str) -> None:
    original = getattr(owner, attribute)

    @functools.wraps(original)
    async def marked(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        async for item in original(*args, **kwargs):
            log.mark(each)
            yield item

    setattr(owner, attribute, marked)


def _has_updates(args: tuple[Any, ...], _: Any) -> bool:
    """A StepOutputs message (args[1]) that carries tokens."""
    return bool(getattr(args[1], "updates", None))


def install(directory: str | Path) -> None:
    """Marks, in call order for one request:
    front: front.body_read (LightLLM body parsed), front.params_start / params_end (sampling
    parameters), front.images_start (the images' loads started), front.build_start / build_end
    (the prompt tokenized with one placeholder per image, while they load), front.images_wait /
    images_loaded (waiting for the loads), front.prepare_start / prepared (the request's
    checks), front.sent (AddRequest on the channel); engine: engine.received, engine.adding /
    engine.added (`EngineCore.add_request`: image cache lookups, tiling submitted), engine.step_start,
    engine.encode_start / encode_end (ViT and embedding store inside a step's launch),
    engine.launched, engine.step_end, engine.sent (a message with tokens); front:
    front.tokens_received, front.event, front.chunk (the SSE chunk written)."""
    from ocula.engine import engine_core, model_runner
    from ocula.server import (
        async_engine,
        engine_channel,
        images,
        lightllm_responses,
        routes_lightllm,
        serving,
    )

    log = MarkLog(directory)
    # Front.
    _wrap_async(routes_lightllm, "read_body", log, "front.body_start", "front.body_read")
    _wrap(images.FrontImages, "_start_loads", log, before="front.images_start")
    _wrap_async(
        images.FrontImages, "_finish_loads", log, "front.images_wait", "front.images_loaded"
    )
    _wrap(routes_lightllm, "to_sampling_params", log, "front.params_start", "front.params_end")
    _wrap(images, "tokenize_compact", log, "front.build_start", "front.build_end")
    _wrap(async_engine.AsyncEngine, "prepare", log, "front.prepare_start", "front.prepared")
    _wrap(async_engine.AsyncEngine, "_send", log, before="front.sent")
    _wrap(async_engine.AsyncEngine, "_on_message", log, "front.tokens_received", when=_has_updates)
    _wrap_async_iterator(serving, "run_request", log, "front.event")
    _wrap_async_iterator(lightllm_responses, "stream_events", log, "front.chunk")
    routes_lightllm.stream_events = lightllm_responses.stream_events  # imported by name there
    # Engine process.
    _wrap(
        engine_channel.EngineSideChannel,
        "receive",
        log,
        after="engine.received",
        when=lambda _, result: bool(result),
    )
    _wrap(engine_channel.EngineSideChannel, "send", log, before="engine.sent", when=_has_updates)
    _wrap(engine_core.EngineCore, "add_request", log, "engine.adding", "engine.added")
    _wrap(engine_core.EngineCore, "step", log, before="engine.step_start", after="engine.step_end")
    _wrap(model_runner.ModelRunner, "launch", log, after="engine.launched")
    _wrap(
        model_runner.ModelRunner,
        "_update_image_embeddings",
        log,
        before="engine.encode_start",
        after="engine.encode_end",
        when=lambda args, _: bool(args[1].encoder_inputs),
    )


def read_marks(directory: Path) -> list[tuple[float, str]]:
    """Every mark of every process, in time order."""
    marks = []
    for path in directory.glob("marks-*.log"):
        for line in path.read_text().splitlines():
            stamp, name = line.split(" ", 1)
            marks.append((float(stamp), name))
    return sorted(marks)
