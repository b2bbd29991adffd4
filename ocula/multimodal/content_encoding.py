"""A fetched body's `Content-Encoding` undone under the image byte limit.

httpx decodes gzip and deflate bodies chunk by chunk with no bound on what one chunk becomes: a
6.8 KB double-gzip body grew to 4 GiB before the size check saw it. Image fetches therefore read
the raw bytes (themselves capped) and inflate them here, each layer stopped one byte past the
limit. Only the encodings the fetch asks for (`ACCEPTED_ENCODINGS`) are undone; any other is
an ImageError, as is a truncated or corrupt stream.
"""

from __future__ import annotations

import zlib

from ocula.multimodal.image_loading import ImageError

# What image fetches send as Accept-Encoding: the encodings `decode_content` can bound.
ACCEPTED_ENCODINGS = "gzip, deflate"
# More layers than this is no server's doing (each layer is already bounded; this bounds the
# number of passes too).
MAX_ENCODING_LAYERS = 2

_GZIP_WBITS = 16 + zlib.MAX_WBITS
_ZLIB_WBITS = zlib.MAX_WBITS
_RAW_DEFLATE_WBITS = -zlib.MAX_WBITS


def content_codings(header: str) -> list[str]:
    """The codings a Content-Encoding header lists, in the order they were applied, without
    `identity` (which changes nothing)."""
    codings = [part.strip().lower() for part in header.split(",")]
    return [coding for coding in codings if coding and coding != "identity"]


def decode_content(raw: bytes, header: str, max_bytes: int) -> bytes:
    """`raw` with the header's codings undone (the last applied first). Raises ImageError: 413
    when a layer would exceed `max_bytes`, 422 for an unsupported coding, too many layers, or a
    stream that does not inflate."""
    codings = content_codings(header)
    if len(codings) > MAX_ENCODING_LAYERS:
        raise ImageError(f"the image's Content-Encoding has too many layers ({header!r})", 422)
    data = raw
    for coding in reversed(codings):
        if coding in ("gzip", "x-gzip"):
            data = _inflate(data, _GZIP_WBITS, max_bytes, coding)
        elif coding == "deflate":  # zlib-wrapped as the RFC says, or raw as some servers send
            try:
                data = _inflate(data, _ZLIB_WBITS, max_bytes, coding)
            except ImageError as error:
                if error.status == 413:
                    raise
                data = _inflate(data, _RAW_DEFLATE_WBITS, max_bytes, coding)
        else:
            raise ImageError(
                f"the image was sent with Content-Encoding {coding!r}; this server accepts "
                f"{ACCEPTED_ENCODINGS}",
                422,
            )
    return data


def _inflate(data: bytes, wbits: int, max_bytes: int, coding: str) -> bytes:
    decompressor = zlib.decompressobj(wbits)
    try:
        out = decompressor.decompress(data, max_bytes + 1)
    except zlib.error as exc:
        raise ImageError(f"the image's {coding} encoding is corrupt ({exc})", 422) from exc
    if len(out) > max_bytes:
        raise ImageError(f"the image is larger than the limit of {max_bytes} bytes", 413)
    if not decompressor.eof:
        raise ImageError(f"the image's {coding} stream is truncated", 422)
    return out
