"""URL image references fetched from a real local HTTP server: redirects, timeouts, size caps,
refused and private addresses, and the address policy itself."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import ipaddress
import socket
import threading
import time
import tracemalloc
import zlib
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


def gzipped_zeros(size: int) -> bytes:
    """`size` zero bytes gzipped, without ever holding them (a body that inflates ~1000x)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1 << 20)
    return b"".join(compressor.compress(block) for _ in range(size >> 20)) + compressor.flush()


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


# Bodies sent with a Content-Encoding: path -> (header, body).
ENCODED = {
    "/gzip": ("gzip", gzip.compress(PNG_BYTES)),
    "/gzip-twice": ("gzip, gzip", gzip.compress(gzip.compress(PNG_BYTES))),
    "/deflate": ("deflate", zlib.compress(PNG_BYTES)),
    "/raw-deflate": ("deflate", raw_deflate(PNG_BYTES)),
    "/identity": ("identity", PNG_BYTES),
    # 64 MiB of zeros gzipped twice: ~200 bytes on the wire
    "/bomb": ("gzip, gzip", gzip.compress(gzipped_zeros(64 << 20))),
    "/gzip-thrice": ("gzip, gzip, gzip", gzip.compress(gzip.compress(gzip.compress(PNG_BYTES)))),
    "/brotli": ("br", PNG_BYTES),
    "/corrupt-gzip": ("gzip", b"\x1f\x8b" + b"not a gzip stream"),
    "/truncated-gzip": ("gzip", gzip.compress(PNG_BYTES)[:-20]),
}
ACCEPT_ENCODINGS_SEEN: list[str] = []
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
        if self.path in ENCODED:
            ACCEPT_ENCODINGS_SEEN.append(self.headers.get("Accept-Encoding", ""))
            self.reply(200, ENCODED[self.path][1], encoding=ENCODED[self.path][0])
            return
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

    def reply(
        self, status: int, body: bytes, declare_length: bool = True, encoding: str = ""
    ) -> None:
        self.send_response(status)
        if encoding:
            self.send_header("Content-Encoding", encoding)
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


def test_encoded_bodies_are_inflated_under_the_byte_limit(server_port):
    """httpx would inflate a body without bound before the size check: the fetch reads the raw
    bytes and inflates each layer only up to the limit."""
    base = f"http://127.0.0.1:{server_port}"
    for path in ["/gzip", "/gzip-twice", "/deflate", "/raw-deflate", "/identity"]:
        assert fetch_url(base + path, LOCAL) == PNG_BYTES, path
    assert set(ACCEPT_ENCODINGS_SEEN) == {"gzip, deflate"}
    tracemalloc.start()
    try:
        limits = ImageLimits(allow_local=True, max_bytes=1 << 20)
        error = error_of(fetch_url, f"{base}/bomb", limits)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert error.status == 413 and "limit of 1048576 bytes" in error.message
    assert peak < 16 << 20, peak  # the 64 MiB the bomb inflates to were never held
    tight = ImageLimits(allow_local=True, max_bytes=len(PNG_BYTES) - 1)
    assert status_of(fetch_url, f"{base}/gzip", tight) == 413
    for path, reason in [
        ("/gzip-thrice", "too many layers"),
        ("/brotli", "Content-Encoding 'br'"),
        ("/corrupt-gzip", "gzip encoding is corrupt"),
        ("/truncated-gzip", "gzip stream is truncated"),
    ]:
        error = error_of(fetch_url, base + path, LOCAL)
        assert (error.status, reason in error.message) == (422, True), (path, error.message)


def test_private_addresses_are_refused_by_default(server_port):
    for host in ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]", "[::1]", "2130706433"]:
        error = error_of(fetch_url, f"http://{host}:{server_port}/image.png", LIMITS)
        assert error.status == 422 and "non-public address" in error.message


PRIVATE_V4 = ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254"]
OTHER_V4 = ["100.64.0.1", "0.0.0.0", "224.0.0.1", "240.0.0.1", "255.255.255.255", "192.0.0.8"]
OTHER_V4 += ["192.0.0.9", "192.88.99.1"]  # is_global in Python, no public image server
NON_GLOBAL_V6 = ["::", "::1", "fe80::1", "fc00::1", "fec0::1", "ff02::1", "::ffff:127.0.0.1"]
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
