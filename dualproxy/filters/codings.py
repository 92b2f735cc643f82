"""Content codings (RFC 9110 8.4.1): decoders and encoders as body transforms.

gzip and deflate come with Python (zlib); br needs `brotli`, zstd needs
`zstandard` (the `compress` extra). A coding whose library is missing is one
this process cannot decode: `decoder` returns None and the body passes as is;
nor encode: `encodable()` leaves it out, so the compress filter never offers it.

The encoders flush after every chunk fed (zlib's Z_SYNC_FLUSH, brotli's flush,
zstd's FLUSH_BLOCK): whatever came from the upstream is decodable by the client
at once, so a stream or an SSE event is not held back waiting for more bytes.
Their levels are the fast ones of each library (see `LEVELS`).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

from ..errors import TransformFailed
from .base import BodyTransform


class _Zlib:
    """gzip or deflate. RFC 9110's "deflate" is the zlib format; some servers send
    raw deflate: the first bytes tell (as browsers and curl do)."""

    __slots__ = ("_z", "_gzip", "_started")

    def __init__(self, gzip: bool) -> None:
        self._gzip = gzip
        self._started = False
        self._z: Any = zlib.decompressobj(16 + zlib.MAX_WBITS if gzip else zlib.MAX_WBITS)

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        if not self._started and not self._gzip:
            self._started = True
            try:
                return bytes(self._z.decompress(chunk))
            except zlib.error:  # raw deflate: no zlib header
                self._z = zlib.decompressobj(-zlib.MAX_WBITS)
        self._started = True
        try:
            return bytes(self._z.decompress(chunk))
        except zlib.error as exc:
            raise TransformFailed(f"the upstream's body does not decode: {exc}") from None

    def finish(self) -> bytes:
        if self._started and not self._z.eof:
            raise TransformFailed("the upstream's encoded body ends before its end mark")
        return bytes(self._z.flush())


class _Brotli:
    __slots__ = ("_d",)

    def __init__(self) -> None:
        import brotli  # type: ignore[import-untyped]

        self._d = brotli.Decompressor()

    def feed(self, chunk: bytes) -> bytes:
        try:
            return bytes(self._d.process(chunk)) if chunk else b""
        except Exception as exc:  # brotli.error
            raise TransformFailed(f"the upstream's body does not decode: {exc}") from None

    def finish(self) -> bytes:
        if not self._d.is_finished():
            raise TransformFailed("the upstream's encoded body ends before its end mark")
        return b""


class _Zstd:
    __slots__ = ("_d", "_fed")

    def __init__(self) -> None:
        import zstandard

        self._d = zstandard.ZstdDecompressor().decompressobj()
        self._fed = False

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        self._fed = True
        try:
            return bytes(self._d.decompress(chunk))
        except Exception as exc:  # zstandard.ZstdError
            raise TransformFailed(f"the upstream's body does not decode: {exc}") from None

    def finish(self) -> bytes:
        if self._fed and not self._d.eof:
            raise TransformFailed("the upstream's encoded body ends before its end mark")
        return b""


# -- encoders ------------------------------------------------------------------------------

#: The levels the encoders use: each library's fast, on-the-fly settings, as a
#: proxy compresses every response anew (docs/compression.md has the measurements,
#: bench/codings.py makes them). gzip 6 is zlib's default (Apache's and Caddy's;
#: nginx's is 1); br 4 runs about twice as fast as gzip 6 (br 5 and up are half as
#: fast again: settings for static files compressed once); zstd 3, zstd's default,
#: about six times as fast, at a ratio close to br 4's.
LEVELS = {b"gzip": 6, b"br": 4, b"zstd": 3}
# brotli's window: 1 MiB (its default, 4 MiB, grows per stream to that much memory).
_BROTLI_WINDOW = 20


class _ZlibEncoder:
    __slots__ = ("_z",)

    def __init__(self) -> None:
        self._z: Any = zlib.compressobj(LEVELS[b"gzip"], zlib.DEFLATED, 16 + zlib.MAX_WBITS)

    def feed(self, chunk: bytes) -> bytes:
        return bytes(self._z.compress(chunk) + self._z.flush(zlib.Z_SYNC_FLUSH))

    def finish(self) -> bytes:
        return bytes(self._z.flush(zlib.Z_FINISH))


class _BrotliEncoder:
    __slots__ = ("_c",)

    def __init__(self) -> None:
        import brotli

        self._c = brotli.Compressor(quality=LEVELS[b"br"], lgwin=_BROTLI_WINDOW)

    def feed(self, chunk: bytes) -> bytes:
        return bytes(self._c.process(chunk) + self._c.flush())

    def finish(self) -> bytes:
        return bytes(self._c.finish())


class _ZstdEncoder:
    __slots__ = ("_c", "_block", "_end")

    def __init__(self) -> None:
        import zstandard

        self._c = zstandard.ZstdCompressor(level=LEVELS[b"zstd"]).compressobj()
        self._block = zstandard.COMPRESSOBJ_FLUSH_BLOCK
        self._end = zstandard.COMPRESSOBJ_FLUSH_FINISH

    def feed(self, chunk: bytes) -> bytes:
        return bytes(self._c.compress(chunk) + self._c.flush(self._block))

    def finish(self) -> bytes:
        return bytes(self._c.flush(self._end))


def _available(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


_DECODERS: dict[bytes, Callable[[], BodyTransform]] = {
    b"gzip": lambda: _Zlib(gzip=True),
    b"x-gzip": lambda: _Zlib(gzip=True),
    b"deflate": lambda: _Zlib(gzip=False),
}
_ENCODERS: dict[bytes, Callable[[], BodyTransform]] = {b"gzip": _ZlibEncoder}
if _available("brotli"):
    _DECODERS[b"br"] = _Brotli
    _ENCODERS[b"br"] = _BrotliEncoder
if _available("zstandard"):
    _DECODERS[b"zstd"] = _Zstd
    _ENCODERS[b"zstd"] = _ZstdEncoder


def decodable() -> frozenset[bytes]:
    """The codings this process decodes."""
    return frozenset(_DECODERS)


def decoder(coding: bytes) -> BodyTransform | None:
    """A fresh decoder for one content coding (lower-cased), or None if unknown."""
    make = _DECODERS.get(coding)
    return make() if make is not None else None


def encodable() -> frozenset[bytes]:
    """The codings this process encodes (gzip always; br and zstd with their libraries)."""
    return frozenset(_ENCODERS)


def encoder(coding: bytes) -> BodyTransform | None:
    """A fresh encoder for one content coding (lower-cased), or None if unknown."""
    make = _ENCODERS.get(coding)
    return make() if make is not None else None
