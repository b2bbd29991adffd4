"""An image's bytes cross to the engine process once, not with every request that shows it.

A chat about one picture resends the picture with every turn, and a request fanned out to `n`
sequences carries it `n` times. The engine process keeps the payloads it has received in an LRU
bounded in bytes (`EnginePayloads`); the front keeps the same LRU's bookkeeping, keys and sizes
only (`FrontPayloads`), and leaves out of an `AddRequest` every payload the engine holds.

The two LRUs stay identical without a message about them: each applies the same operation for
each image span, in the order of the channel's messages (the only order the engine sees):
- the front adds a key it does not hold and sends the payload; the engine, receiving a payload,
  adds it the same way (both evict the same least recently used keys to make room);
- the front touches a key it holds and sends the span without payload; the engine touches that
  key and puts its payload back into the span.
A payload larger than the whole capacity is sent every time and kept by neither side.

Keys are SHA-256 digests of the image's bytes (`ImageSpan.payload_key`), whichever form the
payload takes (the bytes, or base64 text the front did not decode), never MD5, which a forger
could make collide.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

from ocula.engine.request import ImageSpan
from ocula.server.to_engine import AddRequest

# Bytes of image payloads the engine process keeps (base64 text counts its characters).
PAYLOAD_CACHE_BYTES = 256 << 20


class PayloadLRU:
    """Keys and sizes of payloads, least recently used first, within `capacity_bytes`."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._sizes: OrderedDict[str, int] = OrderedDict()
        self.num_bytes = 0

    def __contains__(self, key: str) -> bool:
        return key in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def keys(self) -> list[str]:
        """Least recently used first."""
        return list(self._sizes)

    def touch(self, key: str) -> None:
        self._sizes.move_to_end(key)

    def add(self, key: str, size: int) -> list[str]:
        """Keeps a new key (unless it is larger than the capacity); returns the keys evicted.
        A key held already is only touched."""
        if key in self._sizes:
            self.touch(key)
            return []
        if size > self.capacity_bytes:
            return []
        evicted = []
        while self.num_bytes + size > self.capacity_bytes:
            old, old_size = self._sizes.popitem(last=False)
            self.num_bytes -= old_size
            evicted.append(old)
        self._sizes[key] = size
        self.num_bytes += size
        return evicted


def _payload(span: ImageSpan) -> bytes | str | None:
    return span.image_bytes if span.image_bytes is not None else span.image_base64


def _with_payload(
    span: ImageSpan, image_bytes: bytes | None, image_base64: str | None
) -> ImageSpan:
    copied = copy.copy(span)  # a shallow copy: `dataclasses.replace` costs several times more
    copied.image_bytes, copied.image_base64 = image_bytes, image_base64
    return copied


def _with_spans(message: AddRequest, spans: list[ImageSpan]) -> AddRequest:
    if all(new is old for new, old in zip(spans, message.images, strict=True)):
        return message
    copied = copy.copy(message)
    copied.images = spans
    return copied


class FrontPayloads:
    """The front's side: strips the payloads the engine already holds."""

    def __init__(self, capacity_bytes: int = PAYLOAD_CACHE_BYTES) -> None:
        self.lru = PayloadLRU(capacity_bytes)

    def strip(self, message: AddRequest) -> AddRequest:
        """`message` without the payloads the engine holds (the message itself is not changed).
        Call it once per message sent, in sending order: it records what the engine will hold
        after receiving it."""
        if not message.images:
            return message
        spans = []
        for span in message.images:
            payload = _payload(span)
            if span.payload_key is None or payload is None:
                spans.append(span)
            elif span.payload_key in self.lru:
                self.lru.touch(span.payload_key)
                spans.append(_with_payload(span, None, None))
            else:
                self.lru.add(span.payload_key, len(payload))
                spans.append(span)
        return _with_spans(message, spans)


class EnginePayloads:
    """The engine's side: keeps the payloads received and puts them back into later spans."""

    def __init__(self, capacity_bytes: int = PAYLOAD_CACHE_BYTES) -> None:
        self.lru = PayloadLRU(capacity_bytes)
        self._payloads: dict[str, bytes | str] = {}

    def restore(self, message: AddRequest) -> AddRequest:
        """`message` with every span's payload. Call it for every message received, in order,
        before anything can reject it. Raises RuntimeError if the front left out a payload
        this side does not hold (the two sides disagree: a bug)."""
        if not message.images:
            return message
        spans = []
        for span in message.images:
            payload = _payload(span)
            key = span.payload_key
            if key is None:
                spans.append(span)
            elif payload is not None:
                for old in self.lru.add(key, len(payload)):
                    del self._payloads[old]
                if key in self.lru:
                    self._payloads[key] = payload
                spans.append(span)
            else:
                kept = self._payloads.get(key)
                if kept is None:
                    raise RuntimeError(
                        f"a request left out the bytes of image {key}, which this engine does "
                        "not hold: the front's and the engine's payload caches disagree"
                    )
                self.lru.touch(key)
                if isinstance(kept, bytes):
                    spans.append(_with_payload(span, kept, None))
                else:
                    spans.append(_with_payload(span, None, kept))
        return _with_spans(message, spans)
