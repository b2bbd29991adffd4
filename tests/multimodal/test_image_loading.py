"""Image references -> bytes -> RGB images: formats, malformed input, size limits, and URL fetching
against a real local HTTP server (redirects, timeouts, refused and private addresses)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import ipaddress
import socket
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image, ImageFile

from ocula.multimodal.image_loading import (
    ImageError,
    ImageLimits,
    ImageSource,
    address_is_public,
    decode_image,
    fetch_image_bytes,
    make_http_client,
    md5_hex,
)
from ocula.multimodal.loaded_images import KnownImageSizes, load_image

LIMITS = ImageLimits()
LOCAL = ImageLimits(allow_local=True, timeout_s=2.0)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def gradient(width: int = 24, height: int = 16) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 10, y * 15, (x + y) * 5], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
    )


def sixteen_bit_rgb_png(pixels: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG written by hand (PIL cannot save one)."""
    height, width, _ = pixels.shape
    rows = b"".join(b"\x00" + pixels[row].astype(">u2").tobytes() for row in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def with_declared_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    start = data.index(b"\xff\xc0")  # baseline SOF: marker, length, precision, height, width
    return data[: start + 5] + struct.pack(">HH", height, width) + data[start + 9 :]


def with_declared_png_size(data: bytes, width: int, height: int) -> bytes:
    header = struct.pack(">II", width, height) + data[24:29]
    return data[:8] + png_chunk(b"IHDR", header) + data[33:]


def error_of(call, *args) -> ImageError:
    with pytest.raises(ImageError) as caught:
        call(*args)
    return caught.value


def status_of(call, *args) -> int:
    return error_of(call, *args).status


# ---------------------------------------------------------------- decoding


@pytest.mark.parametrize("fmt,options", [("PNG", {}), ("WEBP", {"lossless": True}), ("BMP", {})])
def test_lossless_formats_decode_exactly(fmt, options):
    original = gradient()
    decoded = decode_image(encode(original, fmt, **options), LIMITS)
    assert decoded.mode == "RGB"
    assert np.array_equal(np.asarray(decoded), np.asarray(original))


def test_jpeg_decodes_like_pil():
    data = encode(gradient(), "JPEG", quality=95)
    decoded = np.asarray(decode_image(data, LIMITS)).astype(int)
    assert np.array_equal(decoded, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    assert np.abs(decoded - np.asarray(gradient()).astype(int)).max() < 24


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (8, 8), color) for color in [(255, 0, 0), (0, 0, 255)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert np.all(np.asarray(decode_image(data, LIMITS)) == [255, 0, 0])


def test_sixteen_bit_images_keep_the_high_byte():
    values = np.arange(0, 65536, 4096, dtype=np.uint16).reshape(4, 4)
    gray = decode_image(encode(Image.fromarray(values), "PNG"), LIMITS)
    assert np.array_equal(np.asarray(gray), np.repeat((values >> 8)[..., None], 3, axis=-1))
    rgb16 = np.stack([values, 65535 - values, np.full_like(values, 0x1234)], axis=-1)
    rgb = decode_image(sixteen_bit_rgb_png(rgb16), LIMITS)
    assert np.array_equal(np.asarray(rgb), (rgb16 >> 8).astype(np.uint8))


def test_cmyk_jpeg_converts_to_rgb():
    data = encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=100)
    decoded = np.asarray(decode_image(data, LIMITS)).astype(int)
    assert np.abs(decoded - [255, 0, 0]).max() <= 3


def test_palette_with_transparency_and_alpha_modes():
    palette = Image.new("P", (4, 1))
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.putdata([0, 1, 0, 1])
    data = encode(palette, "PNG", transparency=0)
    assert np.array_equal(
        np.asarray(decode_image(data, LIMITS))[0], [[10, 20, 30], [200, 100, 50]] * 2
    )
    rgba = Image.new("RGBA", (2, 2), (40, 50, 60, 0))  # alpha dropped, not composited
    assert np.all(np.asarray(decode_image(encode(rgba, "PNG"), LIMITS)) == [40, 50, 60])
    la = Image.new("LA", (2, 2), (77, 128))
    assert np.all(np.asarray(decode_image(encode(la, "PNG"), LIMITS)) == 77)
    gray = Image.new("L", (2, 2), 99)
    assert np.all(np.asarray(decode_image(encode(gray, "PNG"), LIMITS)) == 99)


def test_exif_orientation_is_not_applied_like_the_reference():
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    data = encode(gradient(24, 16), "JPEG", exif=exif)
    assert decode_image(data, LIMITS).size == (24, 16)


def test_malformed_images_are_400():
    assert status_of(decode_image, b"hello, this is not an image", LIMITS) == 400
    png = encode(gradient(64, 64), "PNG")
    assert status_of(decode_image, png[: len(png) // 2], LIMITS) == 400
    jpeg = encode(gradient(64, 64), "JPEG")
    assert status_of(decode_image, jpeg[: len(jpeg) // 2], LIMITS) == 400
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    # EPS is never handed to PIL (its decoder runs Ghostscript).
    assert (
        status_of(decode_image, b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 1 1\n", LIMITS) == 400
    )


def test_pixel_bombs_are_refused_from_the_header(monkeypatch):
    jpeg = encode(gradient(8, 8), "JPEG")
    png = encode(gradient(8, 8), "PNG")
    bombs = [
        with_declared_jpeg_size(jpeg, 30000, 30000),  # above PIL's own bomb limit
        with_declared_jpeg_size(jpeg, 8000, 8000),  # above ours (40 MP), below PIL's
        with_declared_png_size(png, 7000, 7000),
    ]

    def refuse_to_decode(self):
        raise AssertionError("pixels were decoded before the size check")

    # Any decode would raise inside the guarded block and come out as 400, so 413 proves the
    # refusal came from the header alone.
    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse_to_decode)
    monkeypatch.setattr(Image.Image, "load", refuse_to_decode)
    for bomb in bombs:
        assert status_of(decode_image, bomb, LIMITS) == 413
    assert status_of(decode_image, png, ImageLimits(max_pixels=63)) == 413
    assert status_of(decode_image, png, LIMITS) == 400  # the spy works


def test_byte_limit():
    data = encode(gradient(), "PNG")
    assert status_of(decode_image, data, ImageLimits(max_bytes=len(data) - 1)) == 413
    payload = base64.b64encode(data).decode()
    source = ImageSource.parse({"type": "base64", "data": payload})
    limits = ImageLimits(max_bytes=len(data) - 1)
    assert status_of(lambda: asyncio.run(fetch(source, limits))) == 413


# ---------------------------------------------------------------- inline sources


async def fetch(source: ImageSource, limits: ImageLimits) -> bytes:
    async with make_http_client() as client:
        return await fetch_image_bytes(source, limits, client)


def test_base64_and_data_uris():
    data = encode(gradient(), "PNG")
    payload = base64.b64encode(data).decode()
    wrapped = "\n".join(payload[i : i + 76] for i in range(0, len(payload), 76))
    for raw in [
        {"type": "base64", "data": payload},
        {"type": "base64", "data": wrapped},
        {"type": "base64", "data": payload.rstrip("=")},
        {"type": "base64", "data": "data:image/png;base64," + payload},
        {"type": "url", "data": "data:image/png;base64," + payload},
        {"type": "url", "data": "DATA:;base64," + payload},
    ]:
        assert asyncio.run(fetch(ImageSource.parse(raw), LIMITS)) == data


def test_bad_references_are_400():
    bad = [
        "not a dict",
        {"type": "file", "data": "/etc/passwd"},
        {"type": "base64"},
        {"type": "base64", "data": "   "},
        {"type": "url", "data": "data:image/png,rawbytes"},
        {"type": "base64", "data": "data:text/plain;base64,aGVsbG8="},
    ]
    for raw in bad:
        assert status_of(ImageSource.parse, raw) == 400
    for payload in ["not base64!!", "ab$d", "a", "éé=="]:
        source = ImageSource.parse({"type": "base64", "data": payload})
        assert status_of(lambda s=source: asyncio.run(fetch(s, LIMITS))) == 400
    for url in ["file:///etc/passwd", "ftp://example.com/a.png", "http:///nohost"]:
        source = ImageSource.parse({"type": "url", "data": url})
        assert status_of(lambda s=source: asyncio.run(fetch(s, LIMITS))) == 400


def run_load_image(raw: dict):
    async def load():
        async with make_http_client() as client:
            return await load_image(ImageSource.parse(raw), LIMITS, client)

    return asyncio.run(load())


def test_load_image_returns_bytes_md5_and_rgb():
    data = encode(gradient(), "PNG")
    loaded = run_load_image({"type": "base64", "data": base64.b64encode(data).decode()})
    assert loaded.data == data
    assert loaded.md5 == md5_hex(data) == hashlib.md5(data).hexdigest()
    assert loaded.size == (24, 16)
    not_an_image = {"type": "base64", "data": base64.b64encode(b"plain text").decode()}
    assert status_of(run_load_image, not_an_image) == 400


async def run_known(payload: str, known: KnownImageSizes):
    async with make_http_client() as client:
        source = ImageSource.parse({"type": "base64", "data": payload})
        return await load_image(source, LIMITS, client, known)


def test_an_image_seen_before_is_not_decoded_again(monkeypatch: pytest.MonkeyPatch):
    from ocula.multimodal import loaded_images

    decoded: list[int] = []
    real_decode = loaded_images.decode_image

    def counting_decode(data: bytes, limits: ImageLimits):
        decoded.append(len(data))
        return real_decode(data, limits)

    monkeypatch.setattr(loaded_images, "decode_image", counting_decode)
    known = KnownImageSizes(capacity=2)
    pictures = [encode(gradient(), "PNG"), encode(gradient(), "BMP"), encode(gradient(), "GIF")]

    async def load_all(datas: list[bytes]) -> list:
        async with make_http_client() as client:
            return [
                await load_image(
                    ImageSource.parse({"type": "base64", "data": base64.b64encode(d).decode()}),
                    LIMITS,
                    client,
                    known,
                )
                for d in datas
            ]

    first = asyncio.run(load_all(pictures[:2]))
    again = asyncio.run(load_all(pictures[:2]))
    # The same payloads: neither decoded nor even base64-decoded again; the payload stands in
    # for the bytes (the engine decodes it on a cache miss).
    assert len(decoded) == 2
    assert [(i.md5, i.size) for i in again] == [(i.md5, i.size) for i in first]
    for image, seen in zip(again, first, strict=True):
        assert image.data is None and base64.b64decode(image.base64) == seen.data
    assert all(image.size == (24, 16) for image in again)
    asyncio.run(load_all(pictures[2:]))  # a third image evicts the least recently used
    assert len(known) == 2 and known.get(hashlib.sha256(pictures[0]).hexdigest()) is None
    asyncio.run(load_all(pictures[:1]))
    assert len(decoded) == 4
    # The same bytes in another payload (no '=' padding): base64-decoded, not decoded again.
    unpadded = base64.b64encode(pictures[0]).decode().rstrip("=")
    assert unpadded != base64.b64encode(pictures[0]).decode()
    other = asyncio.run(run_known(unpadded, known))
    assert len(decoded) == 4 and (other.data, other.md5) == (pictures[0], first[0].md5)
    # Bytes that failed to decode are not remembered: they fail again, with the same status.
    bad = {"type": "base64", "data": base64.b64encode(b"plain text").decode()}
    for _ in range(2):
        assert status_of(lambda: asyncio.run(load_all([b"plain text"]))) == 400
    assert status_of(run_load_image, bad) == 400


# ---------------------------------------------------------------- URL fetching

PNG_BYTES = encode(gradient(), "PNG")


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        port = self.server.server_address[1]
        routes = {
            "/image.png": lambda: self.reply(200, PNG_BYTES),
            "/hop": lambda: self.redirect("/image.png"),
            "/loop": lambda: self.redirect("/loop"),
            "/to-loopback": lambda: self.redirect(f"http://127.0.0.1:{port}/image.png"),
            "/slow": lambda: (time.sleep(1.5), self.reply(200, PNG_BYTES)),
            "/big-declared": lambda: self.reply(200, b"x" * 5000),
            "/big-streamed": lambda: self.reply(200, b"x" * 5000, declare_length=False),
        }
        routes.get(self.path, lambda: self.reply(404, b"not found"))()

    def reply(self, status: int, body: bytes, declare_length: bool = True) -> None:
        self.send_response(status)
        if declare_length:
            self.send_header("Content-Length", str(len(body)))
        else:
            self.close_connection = True
        self.end_headers()
        with contextlib.suppress(OSError):  # the client may give up (timeout or size cap)
            self.wfile.write(body)

    def redirect(self, location: str) -> None:
        self.send_response(302)
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


def test_a_forged_md5_twin_of_a_known_image_is_still_decoded(monkeypatch: pytest.MonkeyPatch):
    """The caches key images by MD5, whose collisions can be forged: the front's memory of
    sizes must not let a twin's bytes skip their check."""
    from ocula.multimodal import loaded_images
    from ocula.multimodal.image_processing import InternVLImageConfig
    from ocula.multimodal.internvl_prompt import image_cache_key

    monkeypatch.setattr(loaded_images, "md5_hex", lambda data: "same-md5-for-every-input")
    known = KnownImageSizes()

    async def load(data: bytes):
        async with make_http_client() as client:
            source = ImageSource.parse({"type": "base64", "data": base64.b64encode(data).decode()})
            return await load_image(source, LIMITS, client, known)

    small = asyncio.run(load(encode(gradient(), "PNG")))
    assert status_of(lambda: asyncio.run(load(b"\x89PNG\r\n\x1a\n not really"))) == 400
    large = asyncio.run(load(encode(gradient(48, 16), "PNG")))
    assert small.md5 == large.md5 and small.size != large.size
    # Same MD5, different sizes: different embedding-cache keys, so different span lengths
    # never share an embedding.
    tiling = InternVLImageConfig()
    assert image_cache_key(small.md5, small.size, tiling) != image_cache_key(
        large.md5, large.size, tiling
    )


def test_large_payloads_are_decoded_and_hashed_off_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
):
    from ocula.multimodal import image_loading, loaded_images

    threads: dict[str, list[str]] = {"base64": [], "digests": []}
    for name, key in (("decode_base64", "base64"), ("_digests", "digests")):
        real = getattr(loaded_images, name)

        def recording(*args, real=real, key=key):
            threads[key].append(threading.current_thread().name)
            return real(*args)

        monkeypatch.setattr(loaded_images, name, recording)
        if name == "decode_base64":  # small payloads decode through fetch_image_bytes
            monkeypatch.setattr(image_loading, name, recording)
    noise = np.random.default_rng(0).integers(0, 256, (800, 800, 3), dtype=np.uint8)
    large = encode(Image.fromarray(noise), "PNG")
    assert len(large) > loaded_images.INLINE_WORK_BYTES
    small = encode(gradient(), "PNG")
    loaded = [
        run_load_image({"type": "base64", "data": base64.b64encode(data).decode()})
        for data in (large, small)
    ]
    assert [image.size for image in loaded] == [(800, 800), (24, 16)]
    assert loaded[0].md5 == md5_hex(large)
    main = threading.main_thread().name
    assert threads["base64"][0] != main and threads["digests"][0] != main
    assert threads["base64"][1] == threads["digests"][1] == main  # small: inline


def test_a_payload_seen_before_reaches_the_engine_as_base64_and_tiles_the_same():
    import torch

    from ocula.engine.request import ImageSpan
    from ocula.multimodal.image_processing import InternVLImageConfig
    from ocula.multimodal.preprocess_span import preprocess_span

    known = KnownImageSizes()
    payload = base64.b64encode(encode(gradient(), "PNG")).decode()
    first = asyncio.run(run_known(payload, known))
    # Wrapped at 76 columns (MIME style): the same payload once the whitespace is gone.
    wrapped = "\n".join(payload[i : i + 76] for i in range(0, len(payload), 76))
    again = asyncio.run(run_known(wrapped, known))
    assert first.data is not None and again.data is None and again.base64 == payload
    tiling = InternVLImageConfig(image_size=8, max_num=6)
    tiles = [
        preprocess_span(ImageSpan("k", 0, 1, i.data, tiling=tiling, image_base64=i.base64))
        for i in (first, again)
    ]
    assert tiles[0].shape[0] > 1 and torch.equal(tiles[0], tiles[1])
