"""A request's images are loaded under the admission its generation meets: a client that leaves
while its image is still being fetched stops the fetch, and a full server refuses a new request
before touching its images. A tiny InternVL server with two places (one running, one waiting)
and an image site whose /hang answers only when the test lets it."""

from __future__ import annotations

import http.server
import signal
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from ocula.server.api_server import SHUTDOWN_GRACE_SECONDS
from tests.helpers.images import random_png
from tests.helpers.server import RunningServer, start_server
from tests.helpers.tiny_internvl import make_hf_internvl
from tests.server.load_tools import metrics, wait_until_idle

TILE_TOKENS = {"INTERNVL_IMAGE_LENGTH": "4"}  # the tiny checkpoint's 56 px tiles
IMAGE = random_png(60, 60, 3)


class ImageSite(http.server.ThreadingHTTPServer):
    """Serves /image.png at once and /hang... once `release` is set; counts the GETs by path
    and records the /hang... paths whose client closed the connection before the answer."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.release = threading.Event()
        self.gets: dict[str, int] = {}
        self.abandoned: set[str] = set()
        self.lock = threading.Lock()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: ImageSite

    def do_GET(self) -> None:
        site = self.server
        with site.lock:
            site.gets[self.path] = site.gets.get(self.path, 0) + 1
        if self.path.startswith("/hang"):
            self.connection.settimeout(0.05)
            while not site.release.is_set():
                try:  # the fetching client closed its connection: its request was dropped
                    if self.connection.recv(1, 2) == b"":  # 2 = MSG_PEEK
                        with site.lock:
                            site.abandoned.add(self.path)
                        return
                except TimeoutError:
                    pass
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(IMAGE)))
        self.end_headers()
        self.wfile.write(IMAGE)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def site() -> Iterator[ImageSite]:
    server = ImageSite()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.release.set()
    server.shutdown()


@pytest.fixture(scope="module")
def vlm_server(tmp_path_factory) -> Iterator[RunningServer]:
    checkpoint = make_hf_internvl(tmp_path_factory.mktemp("internvl"), "qwen2")
    running = start_server(
        checkpoint,
        tmp_path_factory.mktemp("preparing-logs"),
        "--enable_multimodal",
        "--allow_local_media",
        "--running_max_req_size",
        "1",
        "--max_waiting_requests",
        "1",
        env=TILE_TOKENS,
    )
    yield running
    assert running.stop() == 0, running.log()


def image_request(url: str) -> dict:
    return {
        "inputs": "<img></img>What is this?",
        "parameters": {"max_new_tokens": 2},
        "multimodal_params": {"images": [{"type": "url", "data": url}]},
    }


def wait_for(condition, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def post_and_leave(url: str, body: dict, after_s: float) -> None:
    try:
        httpx.post(url, json=body, timeout=after_s)
    except httpx.TimeoutException:
        return
    raise AssertionError("the request should still be fetching its image")


@pytest.mark.parametrize("route", ["/generate", "/generate_stream", "/v1/chat/completions"])
def test_a_client_leaving_during_the_fetch_stops_it(vlm_server, site, route) -> None:
    site.release.clear()
    path = f"/hang-{uuid.uuid4().hex}"  # its own: an earlier test's fetch cannot stand in
    hang = site_url(site) + path
    body = image_request(hang)
    if route == "/v1/chat/completions":
        image = {"type": "image_url", "image_url": {"url": hang}}
        body = {"messages": [{"role": "user", "content": [image, "What?"]}], "max_tokens": 2}
    started = time.monotonic()
    post_and_leave(vlm_server.url + route, body, after_s=0.5)
    # The fetch is cancelled with the request, long before its 10 s timeout.
    wait_for(lambda: path in site.abandoned, "the image fetch was not stopped", 5)
    assert time.monotonic() - started < 5
    wait_for(lambda: metrics(vlm_server)["ocula_requests_preparing"] == 0, "still preparing")
    statuses = wait_until_idle(vlm_server)
    assert statuses["ocula_requests_in_flight"] == 0


def test_a_full_server_refuses_before_loading_images(vlm_server, site) -> None:
    site.release.clear()
    before = dict(site.gets)
    holders = [
        threading.Thread(
            target=lambda: httpx.post(
                vlm_server.url + "/generate",
                json=image_request(f"{site_url(site)}/hang"),
                timeout=30,
            )
        )
        for _ in range(2)
    ]
    for thread in holders:
        thread.start()
    try:
        wait_for(lambda: site.gets.get("/hang", 0) == before.get("/hang", 0) + 2, "holders")
        assert metrics(vlm_server)["ocula_requests_preparing"] == 2
        refused = httpx.post(
            vlm_server.url + "/generate", json=image_request(f"{site_url(site)}/image.png")
        )
        assert refused.status_code == 503, refused.text
        assert "at capacity" in refused.json()["error"]["message"]
        assert site.gets.get("/image.png", 0) == before.get("/image.png", 0)  # never fetched
    finally:
        site.release.set()
        for thread in holders:
            thread.join()
    answered = httpx.post(
        vlm_server.url + "/generate", json=image_request(f"{site_url(site)}/image.png")
    )
    assert answered.status_code == 200, answered.text
    assert wait_until_idle(vlm_server)["ocula_requests_preparing"] == 0


def site_url(site: ImageSite) -> str:
    return f"http://127.0.0.1:{site.server_address[1]}"


def test_a_drain_refuses_requests_still_loading_their_images(site, tmp_path) -> None:
    """SIGTERM while an image is being fetched: the request gets 503 server_shutting_down at
    once (it would be refused once ready) instead of holding the drain for its fetch."""
    site.release.clear()
    checkpoint = make_hf_internvl(tmp_path / "internvl", "qwen2")
    flags = ("--enable_multimodal", "--allow_local_media")
    server = start_server(checkpoint, tmp_path, *flags, env=TILE_TOKENS)
    answers: list[httpx.Response] = []
    path = f"/hang-{uuid.uuid4().hex}"
    loader = threading.Thread(
        target=lambda: answers.append(
            httpx.post(server.url + "/generate", json=image_request(site_url(site) + path))
        )
    )
    try:
        loader.start()
        wait_for(lambda: site.gets.get(path, 0) == 1, "the fetch never started")
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        loader.join(30)
        assert server.process.wait(30) == 0, server.log()
    finally:
        site.release.set()
        if server.process.poll() is None:
            server.process.kill()
    assert answers[0].status_code == 503, answers[0].text
    assert answers[0].json()["error"]["type"] == "server_shutting_down"
    assert time.monotonic() - signalled < SHUTDOWN_GRACE_SECONDS  # no wait for the fetch
