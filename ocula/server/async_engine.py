"""The front's handle on the engine process: start it, submit requests, stream their text.

Tokenization, detokenization, stop strings and the fan-out of `n` happen here, in the HTTP
process, so the engine process only ever sees token ids.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing.process
import time
from collections.abc import AsyncIterator, Callable

from ocula.engine.engine_core import EngineStats, request_size_problem
from ocula.engine.model_setup import resolve_model
from ocula.engine.output_processor import SequenceStream, fan_out
from ocula.engine.outputs import TokenUpdate
from ocula.engine.request import ImageSpan
from ocula.multimodal.internvl_prompt import VisionSpec
from ocula.sampling.params import SamplingParams
from ocula.server.args import ServerArgs
from ocula.server.engine_channel import FrontSideChannel
from ocula.server.engine_launch import EngineLaunch
from ocula.server.from_engine import EngineFailed, EngineReady, RequestFailed, StepOutputs
from ocula.server.image_payloads import FrontPayloads
from ocula.server.images import FrontImages
from ocula.server.request_errors import RequestError
from ocula.server.request_types import EngineUnavailableError, PreparedRequest, StreamEvent
from ocula.server.to_engine import AbortRequest, AddRequest, Shutdown

logger = logging.getLogger(__name__)

STARTUP_POLL_SECONDS = 0.05  # how often start-up checks on the engine process


class AsyncEngine:
    def __init__(self, args: ServerArgs) -> None:
        self.args = args
        setup = resolve_model(args)
        self.model_dir = setup.model_dir
        self.model_config = setup.model_config
        self.generation_config = setup.generation_config
        self.tokenizer = setup.load_tokenizer(args)
        self.eos_token_ids = setup.eos_token_ids(args, self.tokenizer)
        self.model_name = args.model_name or setup.model_dir.name
        # Names OpenAI requests may give: the served one, and without --model_name the
        # --model_dir string too (vLLM serves a model under its --model string).
        self.model_names = {self.model_name}
        if args.model_name is None and args.model_dir:
            self.model_names.add(str(args.model_dir))
        # Images are served when the checkpoint has a vision side and --enable_multimodal is on.
        self.images: FrontImages | None = None
        self.is_vision_model = hasattr(self.model_config, "tokens_per_tile")
        if self.is_vision_model and args.enable_multimodal:
            vision = VisionSpec.for_model(self.model_config, self.tokenizer)
            self.images = FrontImages(vision, self.tokenizer, args.allow_local_media)
        self.ready: EngineReady | None = None
        self.stats: EngineStats | None = None
        self.failure: str | None = None
        self._queues: dict[str, asyncio.Queue[TokenUpdate | Exception]] = {}
        self._heard_at = time.monotonic()  # the engine's last message, or the start of its work
        self._owed: set[str] = set()  # (child) requests sent whose last token has not come
        self._channel = FrontSideChannel(self._on_message, self._on_channel_closed)
        self._stopping = False
        self._payloads = FrontPayloads()  # which image payloads the engine process holds
        self._process: multiprocessing.process.BaseProcess | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # Called with every step's stats and ViT batch sizes (the metrics hook).
        self.stats_listeners: list[Callable[[EngineStats, list[int]], None]] = []

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self, launch: EngineLaunch | None = None) -> EngineReady:
        """Takes over the engine process `launch` started (started here when None), accepts its
        connection and waits until it has loaded the model."""
        if launch is None:
            launch = EngineLaunch(self.args)
        self._process = launch.process
        await self._channel.listen(launch.listener)
        if self.images is not None and not self.args.skip_server_warmup:
            await self.images.warm_up()  # while the engine loads
        while self.ready is None:
            if self.failure is not None:
                raise EngineUnavailableError(f"the engine failed to start: {self.failure}")
            if not self._process.is_alive():
                raise EngineUnavailableError(
                    f"the engine process exited with code {self._process.exitcode} while starting"
                )
            await asyncio.sleep(STARTUP_POLL_SECONDS)
        self._tasks.append(asyncio.create_task(self._watch_process()))
        return self.ready

    @property
    def max_prompt_tokens(self) -> int:
        """The longest prompt the engine takes (its effective --max_req_total_len; a new token
        needs one more): huge texts past it are refused before they are tokenized whole."""
        return self.ready.max_req_total_len if self.ready is not None else 1 << 62

    @property
    def healthy(self) -> bool:
        return self.ready is not None and self.failure is None

    async def shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.images is not None:
            await self.images.close()
        self._stopping = True
        if self._process is not None and self._process.is_alive():
            self._channel.send(Shutdown())
            await asyncio.to_thread(self._process.join, 10)
            if self._process.is_alive():
                self._process.kill()
                await asyncio.to_thread(self._process.join, 5)
        self._channel.close()

    def _fail(self, message: str) -> None:
        self.failure = message
        logger.error("engine unavailable: %s", message)
        for queue in self._queues.values():
            queue.put_nowait(EngineUnavailableError(message))

    async def _watch_process(self) -> None:
        assert self._process is not None
        while self._process.is_alive():
            await asyncio.sleep(0.5)
        if self.failure is None:
            self._fail(f"the engine process exited with code {self._process.exitcode}")

    def stalled_seconds(self) -> float:
        """How long the engine has sent nothing while it owes requests tokens (0 when it owes
        none): while it has work it reports every step that changes anything. A client that
        stops reading its stream is no stall: the engine owes it nothing once it finished."""
        return time.monotonic() - self._heard_at if self._owed else 0.0

    def _on_message(self, message: object) -> None:
        """Every message from the engine, as it arrives (on the event loop)."""
        self._heard_at = time.monotonic()
        if isinstance(message, StepOutputs):
            self.stats = message.stats
            for listener in self.stats_listeners:
                listener(message.stats, message.vit_batch_sizes)
            for update in message.updates:
                if update.finish_reason is not None:
                    self._owed.discard(update.request_id)
                queue = self._queues.get(update.request_id)
                if queue is not None:
                    queue.put_nowait(update)
        elif isinstance(message, RequestFailed):
            self._owed.discard(message.request_id)
            queue = self._queues.get(message.request_id)
            if queue is not None:
                queue.put_nowait(RequestError(message.message))
        elif isinstance(message, EngineReady):
            self.ready = message
        elif isinstance(message, EngineFailed):
            self._fail(message.message)

    def _on_channel_closed(self) -> None:
        """The engine process closed its end without being asked: it exited or is exiting;
        `_watch_process` reports its exit code, unless it fails to exit."""
        if self.failure is None and not self._stopping:
            logger.warning("the engine process closed its channel")

    # -- requests -----------------------------------------------------------------------------
    def image_support_error(self) -> str | None:
        """Why this server cannot take images, or None when it can."""
        if self.images is not None:
            return None
        if self.is_vision_model:
            return "images need a server started with --enable_multimodal"
        return (
            f"this model ({self.model_name}) has no vision encoder: images need a "
            "vision-language checkpoint (InternVL) served with --enable_multimodal"
        )

    def prepare(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        images: list[ImageSpan] | None = None,
    ) -> PreparedRequest:
        """Tokenizes and checks a request before anything is sent; raises RequestError.
        `images` are the spans of a prompt already expanded by `FrontImages.build_prompt`."""
        try:
            params.validate(self.model_config.vocab_size)
        except ValueError as error:
            raise RequestError(str(error)) from None
        params = params.with_model_defaults(self.generation_config)
        if isinstance(prompt, str):
            prompt_ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        else:
            vocab = self.model_config.vocab_size
            bad = [
                t
                for t in prompt
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab
            ]
            if bad:
                raise RequestError(f"token ids must be integers in [0, {vocab}); got {bad[:5]}")
            prompt_ids = list(prompt)
        assert self.ready is not None
        problem = request_size_problem(
            len(prompt_ids),
            params.max_new_tokens,
            self.ready.max_req_total_len,
            self.ready.kv_capacity,
        )
        if problem is not None:
            raise RequestError(problem)
        return PreparedRequest(
            prompt if isinstance(prompt, str) else None, prompt_ids, params, list(images or [])
        )

    async def generate(
        self, request_id: str, request: PreparedRequest
    ) -> AsyncIterator[StreamEvent]:
        """Streams the tokens of every sequence of the request. Raises RequestError if the engine
        refuses it, EngineUnavailableError if the engine is gone. Leaving the iteration early
        (client gone, stop string) aborts whatever still runs."""
        if self.failure is not None:
            raise EngineUnavailableError(self.failure)
        params = request.params
        streams: dict[str, SequenceStream] = {}
        queue: asyncio.Queue[TokenUpdate | Exception] = asyncio.Queue()
        children = fan_out(request_id, params)
        if any(child_id in self._queues for child_id, _ in children):
            raise RequestError(f"request id {request_id!r} is already in use")
        for index, (child_id, child_params) in enumerate(children):
            streams[child_id] = SequenceStream(
                index,
                self.tokenizer,
                request.prompt_token_ids,
                child_params,
                final_only=request.text_at_end,
            )
            self._queues[child_id] = queue
            self._send(
                AddRequest(
                    child_id,
                    request.prompt_token_ids,
                    child_params,
                    self.eos_token_ids,
                    request.images,
                )
            )
            # The tiles the front made cross once (the engine shares them by image key), and
            # the front does not hold them while the request runs: the payload remakes them.
            for span in request.images:
                if span.image_bytes is not None or span.image_base64 is not None:
                    span.pixel_values = None
        try:
            unfinished = set(streams)
            while unfinished:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                stream = streams[item.request_id]
                if stream.finished:
                    continue
                text = stream.apply(item)
                if stream.finished:
                    unfinished.discard(item.request_id)
                    if item.finish_reason is None:  # a stop string: the engine still runs it
                        self.abort(item.request_id)
                yield StreamEvent(
                    stream.index,
                    item.token_id,
                    text,
                    item.logprob,
                    item.top_logprobs,
                    stream.finish_reason,
                    stream.stop_reason,
                    item.num_cached_tokens,
                    item.queued_seconds,
                    item.prompt_logprobs,
                )
        finally:
            for child_id, stream in streams.items():
                self._queues.pop(child_id, None)
                if not stream.finished:
                    self.abort(child_id)

    def stop_all(self, error: Exception) -> int:
        """Ends every request in flight: its `generate` raises `error` (and aborts it in the
        engine on the way out). Returns how many requests were stopped."""
        queues = {id(queue): queue for queue in self._queues.values()}
        for queue in queues.values():
            queue.put_nowait(error)
        return len(queues)

    def abort(self, request_id: str) -> None:
        """Asks the engine to stop a (child) request and free its KV."""
        if self.failure is None:
            self._send(AbortRequest(request_id))

    def _send(self, message: object) -> None:
        """Never blocks, so that it can run in the cleanup of a cancelled stream."""
        if isinstance(message, AddRequest):
            message = self._payloads.strip(message)  # only here: sending order is its contract
            if not self._owed:  # the engine had no work: its silence so far was no stall
                self._heard_at = time.monotonic()
            self._owed.add(message.request_id)
        elif isinstance(message, AbortRequest):
            self._owed.discard(message.request_id)
        self._channel.send(message)
