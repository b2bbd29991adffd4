"""URL image references fetched from a real local HTTP server: redirects, timeouts, size caps,
refused and private addresses, and the address policy itself."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ocula.multimodal.image_fetching import (
    FetchGate,
    ImageHttpClient,
    address_is_public,
    fetch_image_bytes,
)
from ocula.multimodal.image_loading import ImageError, ImageLimits, ImageSource
from ocula.server import images as front_images
from tests.helpers.image_loading import LIMITS, LOCAL, encode, error_of, fetch, gradient, status_of

PNG_BYTES = encode(gradient(), "PNG")
CONCURRENCY = {"now": 0, "peak": 0}  # requests to /counted in progress, and their most at once
COUNTER_LOCK = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        port = self.server.server_address[1]
        routes = {
            "/image.png": lambda: self.reply(200, PNG_BYTES),
            "/hop": lambda: self.redirect("/image.png"),
            "/loop": lambda: self.redirect("/loop"),
            "/no-location": lambda: self.redirect(None),
            "/counted": self.counted,
            "/to-loopback": lambda: self.redirect(f"http://127.0.0.1:{port}/image.png"),
            "/slow": lambda: (time.sleep(1.5), self.reply(200, PNG_BYTES)),
            "/big-declared": lambda: self.reply(200, b"x" * 5000),
            "/big-streamed": lambda: self.reply(200, b"x" * 5000, declare_length=False),
        }
        routes.get(self.path, lambda: self.reply(404, b"not found"))()

    def counted(self) -> None:
        """Replies after 0.2 s, counting the requests in progress (CONCURRENCY)."""
        with COUNTER_LOCK:
            CONCURRENCY["now"] += 1
            CONCURRENCY["peak"] = max(CONCURRENCY["peak"], CONCURRENCY["now"])
        time.sleep(0.2)
        with COUNTER_LOCK:
            CONCURRENCY["now"] -= 1
        self.reply(200, PNG_BYTES)

    def reply(self, status: int, body: bytes, declare_length: bool = True) -> None:
        self.send_response(status)
        if declare_length:
            self.send_header("Content-Length", str(len(body)))
        else:
            self.close_connection = True
        self.end_headers()
        with contextlib.suppress(OSError):  # the client may give up (timeout or size cap)
            self.wfile.write(body)

    def redirect(self, location: str | None) -> None:
        self.send_response(302)
        if location is not None:
            self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture(scope="module")
def server_port():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def fetch_url(url: str, limits: ImageLimits) -> bytes:
    return asyncio.run(fetch(ImageSource.parse({"type": "url", "data": url}), limits))


def test_fetch_from_local_server_when_allowed(server_port):
    assert fetch_url(f"http://127.0.0.1:{server_port}/image.png", LOCAL) == PNG_BYTES
    assert fetch_url(f"http://127.0.0.1:{server_port}/hop", LOCAL) == PNG_BYTES
    allowed = ImageLimits(allowed_hosts=("LOCALHOST",))
    assert fetch_url(f"http://localhost:{server_port}/image.png", allowed) == PNG_BYTES


def test_unfetchable_urls_are_422(server_port):
    base = f"http://127.0.0.1:{server_port}"
    with socket.socket() as probe:  # a port with nothing listening
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    for url, limits, reason in [
        (f"{base}/missing.png", LOCAL, "HTTP 404"),
        (f"{base}/loop", LOCAL, "more than 3 redirects"),
        (f"{base}/no-location", LOCAL, "redirected without a Location header"),
        (f"{base}/slow", ImageLimits(allow_local=True, timeout_s=0.3), "timed out after 0.3s"),
        (f"http://127.0.0.1:{closed_port}/a.png", LOCAL, "could not connect"),
        ("http://host.invalid/a.png", LOCAL, "could not resolve"),
        (
            f"http://localhost:{server_port}/to-loopback",
            ImageLimits(allowed_hosts=("localhost",)),
            "127.0.0.1 resolves to the non-public address",
        ),
    ]:
        started = time.perf_counter()
        error = error_of(fetch_url, url, limits)
        assert (error.status, reason in error.message) == (422, True), error.message
        assert time.perf_counter() - started < 1.2  # the slow handler sleeps 1.5 s


def test_oversize_bodies_are_413(server_port):
    small = ImageLimits(allow_local=True, max_bytes=1000)
    for path in ["/big-declared", "/big-streamed"]:
        assert status_of(fetch_url, f"http://127.0.0.1:{server_port}{path}", small) == 413


def test_private_addresses_are_refused_by_default(server_port):
    for host in ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]", "[::1]", "2130706433"]:
        error = error_of(fetch_url, f"http://{host}:{server_port}/image.png", LIMITS)
        assert error.status == 422 and "non-public address" in error.message


PRIVATE_V4 = ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254"]
OTHER_V4 = ["100.64.0.1", "0.0.0.0", "224.0.0.1", "240.0.0.1", "255.255.255.255"]
NON_GLOBAL_V6 = ["::", "::1", "fe80::1", "fc00::1", "ff02::1", "::ffff:127.0.0.1"]
EMBEDDED_V4 = ["::ffff:10.0.0.1", "2002:7f00:1::1", "64:ff9b::a00:1"]  # mapped, 6to4, NAT64
NON_PUBLIC = PRIVATE_V4 + OTHER_V4 + NON_GLOBAL_V6 + EMBEDDED_V4
PUBLIC = ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"]


def test_address_policy():
    for address in NON_PUBLIC:
        assert not address_is_public(ipaddress.ip_address(address)), address
    for address in PUBLIC:
        assert address_is_public(ipaddress.ip_address(address)), address


def test_the_gate_runs_a_bounded_number_of_fetches_and_refuses_past_its_queue(server_port):
    # 2 run at once and 3 may wait: of 8 fetches started together, 3 are refused at once (503)
    # and 5 are served, the server never seeing more than 2 at a time.
    source = ImageSource.parse({"type": "url", "data": f"http://127.0.0.1:{server_port}/counted"})
    limits = ImageLimits(allow_local=True, timeout_s=5.0)

    async def main() -> list:
        async with ImageHttpClient(FetchGate(max_running=2, max_waiting=3)) as client:
            fetches = (fetch_image_bytes(source, limits, client) for _ in range(8))
            return await asyncio.gather(*fetches, return_exceptions=True)

    CONCURRENCY.update(now=0, peak=0)
    results = asyncio.run(main())
    refused = [r for r in results if isinstance(r, ImageError)]
    assert len(refused) == 3 and all(e.status == 503 and "retry" in e.message for e in refused)
    assert [r for r in results if not isinstance(r, ImageError)] == [PNG_BYTES] * 5
    assert CONCURRENCY["peak"] == 2


def test_a_fetch_waits_for_its_turn_no_longer_than_the_timeout(server_port):
    # One place, held by a slow fetch (1.5 s): the second gives up after its 0.3 s wait (503).
    slow = ImageSource.parse({"type": "url", "data": f"http://127.0.0.1:{server_port}/slow"})
    limits = ImageLimits(allow_local=True, timeout_s=5.0)

    async def main() -> list:
        async with ImageHttpClient(FetchGate(max_running=1)) as client:
            first = asyncio.ensure_future(fetch_image_bytes(slow, limits, client))
            await asyncio.sleep(0.05)
            short = ImageLimits(allow_local=True, timeout_s=0.3)
            second = await asyncio.gather(
                fetch_image_bytes(slow, short, client), return_exceptions=True
            )
            return [await first, *second]

    started = time.perf_counter()
    first, second = asyncio.run(main())
    assert first == PNG_BYTES
    assert isinstance(second, ImageError) and second.status == 503 and "no turn" in second.message
    assert time.perf_counter() - started < 3


def test_the_first_failed_image_cancels_the_fetches_still_running(server_port, monkeypatch):
    # Image 0 takes 1.5 s, image 1 is a 404: the request fails on image 1 without waiting for
    # image 0, whose fetch is cancelled rather than left running.
    cancelled = []
    real_load = front_images.load_image

    async def watched_load(source, *args):
        try:
            return await real_load(source, *args)
        except asyncio.CancelledError:
            cancelled.append(source.data)
            raise

    monkeypatch.setattr(front_images, "load_image", watched_load)
    slow, missing = (f"http://127.0.0.1:{server_port}/{path}" for path in ("slow", "missing"))
    sources = [{"type": "url", "data": slow}, {"type": "url", "data": missing}]

    async def main() -> None:
        front = front_images.FrontImages(None, None, allow_local_media=True)
        try:
            await front.load(sources)
        finally:
            await front.close()

    with pytest.raises(ImageError) as caught:
        asyncio.run(main())
    assert caught.value.status == 422 and caught.value.message.startswith("image 1: ")
    assert cancelled == [slow]
