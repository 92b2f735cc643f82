"""How the WSGI face reads a request body: the protocol, and where a server plugs in.

The face reads `wsgi.input` with `read(size)`, which any WSGI server offers. A
server module (servers/) may know a faster reader for its own input object; it
registers a `BodySource` here, and the face asks the registry, never the
server's internals: the face knows only this protocol, the server layer knows
the face not at all.
"""

from __future__ import annotations

from typing import Any, Protocol

from .types import Environ


class BodyInput(Protocol):
    """A request body: `read(size)` returns up to `size` bytes, b"" at its end.
    `direct_read` (when the reader has it) is the largest read worth asking for:
    such a reader returns whatever has arrived and never waits for a full piece."""

    def read(self, size: int) -> bytes: ...


class BodySource(Protocol):
    """What a server module registers (servers/gunicorn_body.py)."""

    def recognise(self, stream: Any) -> BodyInput | None:
        """A faster reader for this server's `wsgi.input` object, or None."""

    def client_left(self, exc: BaseException) -> bool:
        """Did a read fail because the client closed its connection (rather than
        because the body was malformed)?"""


SOURCES: list[BodySource] = []


def register(source: BodySource) -> None:
    """Offer `source`'s reader to the WSGI face (once per source)."""
    if source not in SOURCES:
        SOURCES.append(source)


def body_reader(environ: Environ) -> Any:
    """Where to read the request body: a registered server's reader, else `wsgi.input`."""
    stream = environ["wsgi.input"]
    for source in SOURCES:
        reader = source.recognise(stream)
        if reader is not None:
            return reader
    return stream


def read_size(stream: Any, chunk_size: int) -> int:
    """How much to ask `stream` for at a time."""
    direct: int = getattr(stream, "direct_read", 0)
    return max(chunk_size, direct)


def client_left(exc: BaseException) -> bool:
    """Did reading the body fail because the client went away? A ConnectionError
    always means it; a registered server may know its own way of saying it."""
    return isinstance(exc, ConnectionError) or any(
        source.client_left(exc) for source in SOURCES)
