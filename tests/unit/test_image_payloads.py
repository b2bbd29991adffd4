"""Image payloads cross to the engine once: the front's bookkeeping and the engine's store agree."""

from __future__ import annotations

import base64
import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ocula.engine.request import ImageSpan
from ocula.sampling.params import SamplingParams
from ocula.server.image_payloads import EnginePayloads, FrontPayloads, PayloadLRU
from ocula.server.to_engine import AddRequest

IMAGES = [bytes([index]) * (100 + 150 * index) for index in range(8)]  # 100 B .. 1150 B


def span(index: int, as_base64: bool, keyed: bool = True) -> ImageSpan:
    data = IMAGES[index]
    return ImageSpan(
        key=f"md5-{index}",
        offset=10 * index,
        length=4,
        image_bytes=None if as_base64 else data,
        image_base64=base64.b64encode(data).decode() if as_base64 else None,
        payload_key=hashlib.sha256(data).hexdigest() if keyed else None,
    )


def request(spans: list[ImageSpan], number: int = 0) -> AddRequest:
    return AddRequest(f"r{number}", [1, 2, 3], SamplingParams(), frozenset({0}), spans)


def image_of(span: ImageSpan) -> bytes:
    if span.image_bytes is not None:
        return span.image_bytes
    assert span.image_base64 is not None, "the payload did not reach the engine"
    return base64.b64decode(span.image_base64)


def test_an_image_sent_again_travels_without_its_bytes_and_arrives_whole() -> None:
    front, engine = FrontPayloads(), EnginePayloads()
    first = front.strip(request([span(1, as_base64=False)]))
    assert first.images[0].image_bytes == IMAGES[1]  # the first time it travels
    assert image_of(engine.restore(first).images[0]) == IMAGES[1]
    # Again, this time as base64 text the front did not decode: left out, then put back.
    original = request([span(1, as_base64=True), span(1, as_base64=False)], 1)
    again = front.strip(original)
    assert all(s.image_bytes is None and s.image_base64 is None for s in again.images)
    assert image_of(original.images[0]) == IMAGES[1]  # what the front holds is not changed
    restored = engine.restore(again)
    assert [image_of(s) for s in restored.images] == [IMAGES[1], IMAGES[1]]
    assert restored.images[0].key == "md5-1" and restored.images[0].offset == 10


def test_unkeyed_and_oversized_payloads_always_travel() -> None:
    front, engine = FrontPayloads(capacity_bytes=500), EnginePayloads(capacity_bytes=500)
    for number in range(3):
        sent = front.strip(request([span(0, False, keyed=False), span(5, False)], number))
        assert sent.images[0].image_bytes == IMAGES[0]
        assert sent.images[1].image_bytes == IMAGES[5]  # 850 B: more than the whole capacity
        assert [image_of(s) for s in engine.restore(sent).images] == [IMAGES[0], IMAGES[5]]
    assert len(front.lru) == len(engine.lru) == 0


def test_a_payload_the_engine_lacks_is_a_loud_error() -> None:
    front, engine = FrontPayloads(), EnginePayloads()
    front.strip(request([span(2, False)]))  # sent, but this engine never received it
    with pytest.raises(RuntimeError, match="disagree"):
        engine.restore(front.strip(request([span(2, False)], 1)))


def test_the_lru_evicts_least_recently_used_first_within_its_bytes() -> None:
    lru = PayloadLRU(capacity_bytes=1000)
    assert lru.add("a", 400) == [] and lru.add("b", 400) == []
    lru.touch("a")
    assert lru.add("c", 400) == ["b"]
    assert lru.add("a", 400) == []  # held already: touched, not counted twice
    assert lru.num_bytes == 800
    assert lru.add("d", 900) == ["c", "a"]
    assert "d" in lru and len(lru) == 1


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=0, max_value=3000),
    st.lists(
        st.lists(st.tuples(st.integers(0, 7), st.booleans(), st.booleans()), max_size=4),
        max_size=40,
    ),
)
def test_whatever_the_traffic_every_span_reaches_the_engine_with_its_image(
    capacity: int, requests: list[list[tuple[int, bool, bool]]]
) -> None:
    front, engine = FrontPayloads(capacity), EnginePayloads(capacity)
    for number, spans in enumerate(requests):
        sent = front.strip(request([span(i, b64, keyed) for i, b64, keyed in spans], number))
        restored = engine.restore(sent)
        assert [image_of(s) for s in restored.images] == [IMAGES[i] for i, _, _ in spans]
        assert front.lru.keys() == engine.lru.keys()  # the mirror holds
        assert engine.lru.num_bytes <= capacity
