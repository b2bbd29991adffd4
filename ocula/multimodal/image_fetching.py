"""An image reference's encoded bytes: inline base64, or an http(s) URL fetched under limits.

A URL is fetched only from addresses the policy accepts (`address_is_public`, unless
`ImageLimits.allow_local` or `allowed_hosts` exempt the host), every redirect hop checked again,
the connection pinned to the addresses checked, the whole fetch under one timeout and the body
under the byte limit. Failures raise `ImageError` (see `image_loading`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx

from ocula.multimodal.content_encoding import ACCEPTED_ENCODINGS, content_codings, decode_content
from ocula.multimodal.image_loading import ImageError, ImageLimits, ImageSource, decode_base64

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")
# Ranges Python's `is_global` calls global that serve no public image: IETF protocol
# assignments (192.0.0.0/24, e.g. 192.0.0.8, the dummy address), the deprecated 6to4 relay
# anycast, and IPv6 site-local addresses (deprecated, still routed inside some networks).
_NON_PUBLIC_NETWORKS = (
    ipaddress.IPv4Network("192.0.0.0/24"),
    ipaddress.IPv4Network("192.88.99.0/24"),
    ipaddress.IPv6Network("fec0::/10"),
)


# URL fetches in progress at once, per client: below httpx's pool of 100 connections, whose
# queue costs time quadratic in its length (400 requests of 16 URLs each held the event loop for
# minutes). Past MAX_WAITING_FETCHES waiting their turn, a new fetch is refused with a 503.
MAX_RUNNING_FETCHES = 64
MAX_WAITING_FETCHES = 1024


class FetchGate:
    """Lets `max_running` fetches run; the next ones wait their turn, up to `max_waiting`."""

    def __init__(
        self, max_running: int = MAX_RUNNING_FETCHES, max_waiting: int = MAX_WAITING_FETCHES
    ) -> None:
        self.max_waiting = max_waiting
        self.waiting = 0
        self._slots = asyncio.Semaphore(max_running)

    @asynccontextmanager
    async def turn(self, timeout_s: float) -> AsyncIterator[None]:
        """Holds one running place for the body; ImageError (503) when too many wait, or when
        no place frees up within `timeout_s`."""
        busy = "the server is fetching too many images"
        if self.waiting >= self.max_waiting:
            raise ImageError(f"{busy} ({self.waiting} waiting); retry shortly", 503)
        if self._slots.locked():  # no free place: wait for one, at most timeout_s
            self.waiting += 1
            try:
                await asyncio.wait_for(self._slots.acquire(), timeout_s)
            except asyncio.TimeoutError:
                message = f"{busy} (no turn within {timeout_s:g}s); retry shortly"
                raise ImageError(message, 503) from None
            finally:
                self.waiting -= 1
        else:  # taken at once, without yielding to the loop
            await self._slots.acquire()
        try:
            yield
        finally:
            self._slots.release()


class ImageHttpClient(httpx.AsyncClient):
    """The client `fetch_image_bytes` takes: no proxies or settings from the environment (a proxy
    would bypass the address check), no automatic redirects (each hop is checked here), and a
    `FetchGate` bounding its fetches in progress."""

    def __init__(self, gate: FetchGate | None = None) -> None:
        super().__init__(trust_env=False, follow_redirects=False)
        self.gate = gate or FetchGate()


def make_http_client() -> ImageHttpClient:
    return ImageHttpClient()


async def fetch_image_bytes(
    source: ImageSource, limits: ImageLimits, client: ImageHttpClient
) -> bytes:
    """The encoded image bytes (at most `limits.max_bytes`) of an inline or URL source. A URL
    waits at most `limits.timeout_s` for the client's gate to let it run (else 503), then has
    that long again to be fetched (else 422)."""
    if source.kind == "base64":
        return decode_base64(source.data, limits)
    async with client.gate.turn(limits.timeout_s):
        try:
            fetch = _fetch_url(source.data, limits, client)
            return await asyncio.wait_for(fetch, limits.timeout_s)
        except asyncio.TimeoutError as exc:
            message = f"fetching {source.data} timed out after {limits.timeout_s:g}s"
            raise ImageError(message, 422) from exc


def address_is_public(address: IPAddress) -> bool:
    """False for loopback, private, link-local, site-local, multicast, reserved, unspecified
    and other non-global addresses, including IPv4 addresses embedded in IPv6 (mapped, 6to4,
    Teredo, NAT64)."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address_is_public(address.ipv4_mapped)
        embedded = [address.sixtofour, address.teredo[1] if address.teredo else None]
        if address in _NAT64_PREFIX:
            embedded.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        if any(ip is not None and not address_is_public(ip) for ip in embedded):
            return False
    refused = (
        address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
        or any(address in network for network in _NON_PUBLIC_NETWORKS)
    )
    return not refused and address.is_global


async def _fetch_url(url_text: str, limits: ImageLimits, client: httpx.AsyncClient) -> bytes:
    try:
        url = httpx.URL(url_text)
    except httpx.InvalidURL as exc:
        raise ImageError(f"invalid image URL ({exc})", 400) from exc
    if url.scheme not in ("http", "https") or not url.host:
        raise ImageError(f"image URL must be http(s)://host/..., got {url_text!r}", 400)
    try:
        for _ in range(limits.max_redirects + 1):
            addresses = await _checked_addresses(url, limits)
            async with _pinned_get(client, url, addresses, limits) as response:
                if response.is_redirect:  # a 3xx status: it may lack the Location header
                    location = response.headers.get("location")
                    if not location:
                        raise ImageError(f"{url} redirected without a Location header", 422)
                    url = url.join(location)
                    if url.scheme not in ("http", "https"):
                        raise ImageError(f"redirected to a non-http(s) URL: {url}", 422)
                    continue
                if not response.is_success:
                    raise ImageError(f"fetching {url} failed: HTTP {response.status_code}", 422)
                return await _read_capped(response, limits.max_bytes)
    except httpx.TimeoutException as exc:
        raise ImageError(f"fetching {url} timed out after {limits.timeout_s:g}s", 422) from exc
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise ImageError(f"fetching {url} failed ({type(exc).__name__}: {exc})", 422) from exc
    raise ImageError(f"fetching {url_text} took more than {limits.max_redirects} redirects", 422)


async def _checked_addresses(url: httpx.URL, limits: ImageLimits) -> list[IPAddress]:
    """Resolve the URL's host; refuse it unless every address passes the policy."""
    host = url.raw_host.decode("ascii")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ImageError(f"could not resolve the host of {url} ({exc})", 422) from exc
    addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))
    exempt = limits.allow_local or host.lower() in {h.lower() for h in limits.allowed_hosts}
    for address in addresses:
        if not exempt and not address_is_public(address):
            raise ImageError(
                f"refused to fetch {url}: {host} resolves to the non-public address {address} "
                "(local and private addresses need --allow_local_media)",
                422,
            )
    return addresses


@asynccontextmanager
async def _pinned_get(
    client: httpx.AsyncClient, url: httpx.URL, addresses: list[IPAddress], limits: ImageLimits
) -> AsyncIterator[httpx.Response]:
    """GET `url` from the addresses already checked (in order, the next one on a refused
    connection), so a second DNS answer cannot swap in another address. The Host header and the
    TLS server name stay the URL's host, so virtual hosts and certificates work unchanged."""
    last_error: httpx.ConnectError | None = None
    for address in addresses:
        request = client.build_request(
            "GET",
            url.copy_with(host=str(address)),
            headers={"Host": url.netloc.decode("ascii"), "Accept-Encoding": ACCEPTED_ENCODINGS},
            extensions={"sni_hostname": url.raw_host.decode("ascii")},
            timeout=limits.timeout_s,
        )
        try:
            response = await client.send(request, stream=True, follow_redirects=False)
        except httpx.ConnectError as exc:
            last_error = exc
            continue
        try:
            yield response
        finally:
            await response.aclose()
        return
    raise ImageError(f"could not connect to {url} ({last_error})", 422)


async def _read_capped(response: httpx.Response, max_bytes: int) -> bytes:
    """The body, its Content-Encoding undone: the bytes as sent are capped while they arrive,
    and each decoding layer is capped again (`content_encoding`), never httpx's own unbounded
    decoding."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise ImageError(f"image is {declared} bytes, above the limit of {max_bytes}", 413)
    body = bytearray()
    async for chunk in response.aiter_raw():
        body += chunk
        if len(body) > max_bytes:
            raise ImageError(f"image is larger than the limit of {max_bytes} bytes", 413)
    encoding = response.headers.get("content-encoding", "")
    if not content_codings(encoding):
        return bytes(body)
    return await asyncio.to_thread(decode_content, bytes(body), encoding, max_bytes)
