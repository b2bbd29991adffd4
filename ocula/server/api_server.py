"""`python -m ocula.server.api_server [flags]` (also `ocula serve`): the HTTP server.

Start-up order: bind the port (so a port in use fails at once, not after loading the model),
start the engine process (`engine_launch`: before this process imports the front, so that both
import at once), then import and build the front, wait for the engine, and serve.
SIGINT/SIGTERM drain first (new requests get 503, those in flight get SHUTDOWN_GRACE_SECONDS to
finish, then are stopped with a 503 or a last error event), then stop uvicorn, which stops the
engine process; exit code 0. An engine that dies takes the server down with exit code 1.
Before serving (the engine loading, the front importing), SIGINT/SIGTERM stop the engine process
and exit at once, with 128 + the signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

import uvicorn

from ocula.cli_args import parse_config
from ocula.server.args import ServerArgs
from ocula.server.engine_launch import EngineLaunch
from ocula.server.lightllm_flags import ignored_flags_note
from ocula.utils.gc_heap import freeze_heap_at_exit, freeze_startup_heap

# The front's own modules (the app, the engine handle, the serving state) are imported by
# `serve`, after the engine process has started: a module-level import here would also run in
# that process, which imports this module again as the spawn's main module.

logger = logging.getLogger("ocula.server")

SHUTDOWN_GRACE_SECONDS = 5.0  # how long requests in flight at SIGTERM may still run


class _Server(uvicorn.Server):
    """A first SIGTERM/SIGINT only asks for a drain (`drain_requested`, served at once by
    `drain_then_exit`); a second one skips what is left of the drain, and a SIGINT after that
    forces the exit. uvicorn itself would re-raise the signal after its graceful shutdown,
    killing the process before the engine is stopped; here the process exits normally (code 0)
    once the engine process is gone too."""

    def __init__(self, config: uvicorn.Config, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(config)
        self.event_loop = loop
        self.signalled = False
        self.drain_requested = asyncio.Event()

    def handle_exit(self, sig: int, frame: object) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        if self.signalled:
            self.should_exit = True
        self.signalled = True
        # The handler may run anywhere in the loop's thread; this wakes the loop up safely.
        self.event_loop.call_soon_threadsafe(self.drain_requested.set)


async def drain_then_exit(server: _Server, state: Any) -> None:
    """Waits for a shutdown signal, drains `state` (a `serving.ServerState`, see
    `draining.drain`), then stops uvicorn, which closes the port and waits for the last
    responses to be sent."""
    from ocula.server.draining import drain, stop_in_flight

    await server.drain_requested.wait()
    drain_task = asyncio.create_task(drain(state, SHUTDOWN_GRACE_SECONDS))
    while not drain_task.done() and not server.should_exit:
        await asyncio.sleep(0.05)
    if not drain_task.done():  # a second signal: no more waiting, but still a clear answer
        drain_task.cancel()
        stop_in_flight(state)
    server.should_exit = True


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not the default 0: asyncio's own loop (the fallback when uvloop is
    # missing) turns Nagle's algorithm off (TCP_NODELAY) only on connections of such sockets;
    # uvloop does it on every TCP connection. With Nagle on, a response written in two parts
    # (headers, then body) waited for the client's delayed ACK: ~40 ms per request on a
    # kept-alive connection.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise SystemExit(f"cannot listen on {host}:{port}: {error.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


async def serve(args: ServerArgs, sock: socket.socket, launch: EngineLaunch) -> int:
    """Serves on the bound `sock` with the engine process `launch` started; the exit code."""
    try:
        import ocula.server.app  # noqa: F401  the front's modules, imported while the engine loads
        from ocula.server.async_engine import AsyncEngine

        engine = AsyncEngine(args)
    except (ValueError, OSError) as error:  # the model folder or its settings cannot be served
        logger.error("cannot serve %s: %s", args.model_dir or "the default model", error)
        launch.abandon()
        sock.close()
        return 1
    except BaseException:
        launch.abandon()
        sock.close()
        raise
    return await serve_with(engine, args, sock, launch)


async def serve_with(
    engine: Any, args: ServerArgs, sock: socket.socket, launch: EngineLaunch
) -> int:
    """`serve` once the engine handle (an `AsyncEngine`) exists: it owns `launch` from here."""
    from ocula.server.app import build_app
    from ocula.server.async_engine import EngineUnavailableError
    from ocula.server.http_protocol import guarded_protocol
    from ocula.server.idle_wait import FrontSpin
    from ocula.server.stats_log import log_stats_forever

    spin = FrontSpin()
    if args.idle_wait != "sleep":  # may spin: count the worker threads from the image warm-up on
        spin.install()
    try:
        ready = await engine.start(launch)
    except Exception as error:  # the engine process must not outlive a failed start
        if isinstance(error, EngineUnavailableError):
            logger.error("%s", error)
        else:
            logger.exception("the server failed to start")
        await engine.shutdown()
        sock.close()
        return 1
    logger.info(
        "model %s: KV cache of %d tokens, requests up to %d tokens, %d tokens per forward",
        engine.model_name,
        ready.kv_capacity,
        ready.max_req_total_len,
        ready.batch_max_tokens,
    )
    if engine.images is not None:
        logger.info(
            "images: %d tokens per tile, up to %d tiles, embedding cache of %d images within "
            "%g GiB, %d images per ViT forward",
            engine.images.vision.tokens_per_tile,
            engine.images.vision.tiling.max_num,
            args.cache_capacity,
            args.image_cache_gb,
            args.visual_infer_batch_size,
        )
    app = build_app(engine, args)
    config = uvicorn.Config(
        app,
        http=guarded_protocol(args.request_body_timeout_s) or "auto",
        log_level="info",
        timeout_graceful_shutdown=5,
        access_log=False,
    )
    server = _Server(config, asyncio.get_running_loop())

    async def stop_when_engine_fails() -> None:
        while engine.failure is None:
            await asyncio.sleep(0.5)
        server.should_exit = True

    freeze_startup_heap("front")
    if ready.spins_when_idle:
        spin.start()
    logger.info(
        "while idle, the engine process and the front %s (--idle_wait %s)",
        "spin" if ready.spins_when_idle else "sleep",
        args.idle_wait,
    )
    watcher = asyncio.create_task(stop_when_engine_fails())
    drainer = asyncio.create_task(drain_then_exit(server, app.state.ocula))
    stats_logger = None
    if args.log_stats_interval > 0 and not args.disable_log_stats:
        stats_logger = asyncio.create_task(
            log_stats_forever(app.state.ocula, args.log_stats_interval)
        )
    logger.info("ready: http://%s:%d", args.host, args.port)
    try:
        await server.serve(sockets=[sock])
    finally:
        watcher.cancel()
        drainer.cancel()
        if stats_logger is not None:
            stats_logger.cancel()
        await spin.stop()
        await engine.shutdown()
        sock.close()
    return 1 if engine.failure is not None else 0


def run_event_loop(main_coroutine: Coroutine[Any, Any, int]) -> int:
    """Runs the front on uvloop when it is installed (a dependency on Linux), else on asyncio's
    own loop. With uvloop and httptools (which uvicorn picks by itself when installed), a minimal
    streaming route answered 0.3-1.0 ms sooner than with asyncio's loop and h11 (CPU machine,
    2026-12-03, 200 KB request bodies)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main_coroutine)
    return uvloop.run(main_coroutine)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _stop_at_once(launch: EngineLaunch, sock: socket.socket, signum: int, frame: object) -> None:
    """SIGINT or SIGTERM outside uvicorn's serving (which drains on both): during start-up, and
    after a drain. Stops the engine process, removes its channel and exits at once, with 128 +
    the signal. Raising instead (KeyboardInterrupt, SystemExit) may land in a finalizer or a
    weakref callback, which swallows it: the server then started anyway and served on. And
    asyncio's own Ctrl-C handling only cancels the main task, at its next await: 6-8 s into a
    start on a 2-core machine, once the front's imports were done."""
    launch.abandon()
    sock.close()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(128 + signum)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_config(ServerArgs, argv, "Ocula: serve a (vision-)language model over HTTP.")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    freeze_heap_at_exit()
    # Until the engine process is about to start (and on other nodes' ranks), SIGTERM unwinds
    # like Ctrl-C does.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    note = ignored_flags_note(args)
    if note is not None:
        logger.info(note)
    if args.node_rank > 0:  # another node's ranks: no HTTP front here
        from ocula.engine.worker_node import run_worker_node

        sys.exit(run_worker_node(args))
    sock = bind_socket(args.host, args.port)
    try:
        launch = EngineLaunch(args, start=False)
    except BaseException:
        sock.close()
        raise
    stop = functools.partial(_stop_at_once, launch, sock)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        launch.start()
        code = run_event_loop(serve(args, sock, launch))
    finally:  # nothing left once the engine was shut down; a start that failed kills it
        launch.abandon()
    sys.exit(code)


if __name__ == "__main__":
    main()
