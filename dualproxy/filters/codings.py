"""Content codings (RFC 9110 8.4.1): decoders as body transforms.

gzip and deflate come with Python (zlib); br needs `brotli`, zstd needs
`zstandard` (the `compress` extra). A coding whose library is missing is one
this process cannot decode: `decoder` returns None and the body passes as is.
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
if _available("brotli"):
    _DECODERS[b"br"] = _Brotli
if _available("zstandard"):
    _DECODERS[b"zstd"] = _Zstd


def decodable() -> frozenset[bytes]:
    """The codings this process decodes."""
    return frozenset(_DECODERS)


def decoder(coding: bytes) -> BodyTransform | None:
    """A fresh decoder for one content coding (lower-cased), or None if unknown."""
    make = _DECODERS.get(coding)
    return make() if make is not None else None
