"""What both drivers share that is not the protocol: request options, the idle pool.

The rules every driver keeps (the suite checks them on the wire):

- the request line carries `extensions["target"]` as-is and the headers are
  sent exactly as given (the core already wrote Host and framing);
- timeouts come from `extensions["timeout"]`, read again before every wait, so
  the core can switch from the head timeout to the idle timeout mid-response;
  the head's is a deadline for connect plus the whole head (`head_deadline`);
- an exception from the request body iterator propagates unchanged and the
  connection is closed with the body unfinished;
- an upstream that answers before reading the whole upload gets its answer
  relayed (sending stops);
- a connection is reused only when the codec says `reusable` (a cleanly framed,
  fully read response with no stray bytes, no `Connection: close` either side,
  no 101, no cut upload, no ambiguous framing); otherwise it is closed; a
  request body that over- or under-runs its Content-Length is a
  LocalProtocolError, never a completed upload;
- a failed request is sent again, once and on a fresh connection, only when the
  codec's `may_retry` allows it; when it fails for good and not one byte of it
  went out, its exception says so (`tell_unsent`), for the face's retry elsewhere;
- once the transport is closed, connections that come back are closed too.
"""

from __future__ import annotations

import ssl
import sys
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import Any, Generic, Protocol, TypeVar

import httpx

from ..core import byte_headers
from ..framing import FRAMING
from ..upstreams import NOTHING_SENT, UPSTREAM, Upstream
from .connect import Key, upstream_key
from .connection import ClientConnection, Response
from .tls import client_context


class Conn(Protocol):
    """What the shared parts need of a driver's connection."""

    codec: ClientConnection

    def close(self) -> None: ...


C = TypeVar("C", bound=Conn)
# Failures after which `may_retry` is asked (timeouts are never retried).
RETRY_ON = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


def tell_unsent(exc: BaseException, conn: Conn | None) -> None:
    """Mark a failed request's exception when not one byte of it went out, so the
    face may send it to another upstream (core.may_retry)."""
    if conn is not None and conn.codec.nothing_sent:
        setattr(exc, NOTHING_SENT, True)


class Sendable(Protocol):
    """What the waits read of a request: `extensions["timeout"]` (an httpx.Request, a Call)."""

    @property
    def extensions(self) -> dict[str, Any]: ...


class Call:
    """One request as the async driver sends it: the request line, the headers
    exactly as given, the body (None: none), the pool key and httpx's extensions
    (the timeouts are read from there before every wait). The face builds it
    from its plan without an httpx.Request; `of` takes one from httpx."""

    __slots__ = ("method", "target", "headers", "stream", "key", "extensions")

    def __init__(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]],
                 stream: AsyncIterable[bytes] | Iterable[bytes] | None, key: Key,
                 extensions: dict[str, Any]) -> None:
        self.method, self.target, self.headers = method, target, headers
        self.stream, self.key, self.extensions = stream, key, extensions

    @classmethod
    def of(cls, request: httpx.Request) -> Call:
        method, target, headers = request_line(request)
        return cls(method, target, headers, request.stream, origin(request), request.extensions)


class Reply:
    """The final response head and its body stream, as `Pool.send` returns them
    (httpx's Response is built from it only for httpx's interface)."""

    __slots__ = ("head", "stream")

    def __init__(self, head: Response, stream: Any) -> None:
        self.head, self.stream = head, stream

    def close(self) -> None:
        self.stream.close()

    async def aclose(self) -> None:
        await self.stream.aclose()


def timeout(request: Sendable, kind: str) -> float | None:
    timeouts = request.extensions.get("timeout")
    if isinstance(timeouts, dict):
        value = timeouts.get(kind)
        return None if value is None else float(value)
    return None


def head_deadline(request: Sendable, now: float) -> float | None:
    """When the response head must be in by, on the clock `now` is read from: the
    read timeout (the core's `--timeout` until the head) bounds connect plus the
    whole head, however slowly it trickles; restarted once an upload ended (the
    client's pace is not the upstream's)."""
    seconds = timeout(request, "read")
    return None if seconds is None else now + seconds


def time_left(deadline: float | None, now: float) -> float | None:
    return None if deadline is None else max(deadline - now, 0.0)


def connect_timeout(request: Sendable, deadline: float | None, now: float) -> float | None:
    """The connect timeout, cut to what is left of the head's deadline."""
    seconds = timeout(request, "connect")
    left = time_left(deadline, now)
    if left is None:
        return seconds
    return left if seconds is None else min(seconds, left)


def limit(value: int | None) -> int:
    return sys.maxsize if value is None else value  # None: no limit (httpx.Limits)


def origin(request: httpx.Request) -> Key:
    """The pool key of a request: its chosen `Upstream`'s (core.build_request), else its URL's."""
    upstream = request.extensions.get(UPSTREAM)
    if isinstance(upstream, Upstream):
        return upstream_key(upstream)
    url = request.url
    scheme = url.scheme
    port = url.port or (443 if scheme == "https" else 80)
    return scheme, url.host, port


def request_line(request: httpx.Request) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]]:
    """(method, target, headers) as `ClientConnection.send_request` takes them."""
    target = request.extensions.get("target")
    if not isinstance(target, bytes):
        target = request.url.raw_path
    return request.method.encode(), target, request.headers.raw


def to_httpx(head: Response, stream: Any, request: httpx.Request) -> httpx.Response:
    return httpx.Response(
        head.status, headers=byte_headers(head.headers), stream=stream, request=request,
        extensions={"http_version": head.http_version, "reason_phrase": head.reason,
                    FRAMING: head.framing},
    )


class Empty(httpx.AsyncByteStream, httpx.SyncByteStream):
    """The body of a bodiless response (its connection is already back in the pool)."""

    def __iter__(self) -> Iterator[bytes]:
        return iter(())

    async def __aiter__(self) -> AsyncIterator[bytes]:
        empty: tuple[bytes, ...] = ()
        for piece in empty:
            yield piece


_EMPTY = Empty()  # stateless: one for every bodiless response


class IdlePool(Generic[C]):
    """Idle connections per origin, newest last; closed for good by `drain`.

    Not locked: the sync driver holds its lock around every call.
    """

    def __init__(self, max_idle: int | None) -> None:
        self.max_idle = limit(max_idle)
        self.closed = False
        self._idle: dict[Key, list[C]] = {}

    def take(self, key: Key) -> C | None:
        idle = self._idle.get(key)
        return idle.pop() if idle else None

    def put(self, key: Key, conn: C) -> bool:
        """Keep `conn` for reuse; False when it must be closed instead."""
        if self.closed:
            return False
        idle = self._idle.setdefault(key, [])
        if len(idle) >= self.max_idle:
            return False
        idle.append(conn)
        return True

    def drain(self) -> list[C]:
        """Every idle connection, to close; from now on `put` keeps nothing."""
        self.closed = True
        conns = [conn for idle in self._idle.values() for conn in idle]
        self._idle.clear()
        return conns


class Pool(Generic[C]):
    """The limits and idle connections of a transport (each driver adds its waiting)."""

    def __init__(self, *, max_connections: int | None = 100,
                 max_keepalive_connections: int | None = 100,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        """`ssl_context`: for https upstreams (default: `tls.client_context()`)."""
        self._limit = limit(max_connections)
        self._used = 0
        self._idle: IdlePool[C] = IdlePool(max_keepalive_connections)
        self._ssl = ssl_context
        self._init_waiting()

    def in_use(self) -> int:
        """Connections taken for a request now (the metrics' pool gauge samples it)."""
        return self._used

    def _context(self, key: Key) -> ssl.SSLContext | None:
        """The TLS context for `key` (https only): the transport's, else the default."""
        if key[0] != "https":
            return None
        if self._ssl is None:
            self._ssl = client_context()
        return self._ssl

    def _init_waiting(self) -> None:
        """Set up how requests wait for a free slot (a driver's own primitives)."""

    def _checkin(self, key: Key, conn: C) -> None:
        raise NotImplementedError

    def _body(self, key: Key, conn: C, request: Sendable, body: type[PooledBody[C]]) -> Any:
        """The body stream of a final head; a bodiless one frees its connection now."""
        if conn.codec.done:
            self._checkin(key, conn)
            return _EMPTY
        return body(self, key, conn, request)


class PooledBody(Generic[C]):
    """A response body that gives its connection back when it ends or is closed."""

    def __init__(self, pool: Pool[C], key: Key, conn: C, request: Any) -> None:
        self._pool = pool
        self._key = key
        self._conn: C | None = conn
        self._request = request

    def _finish(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool._checkin(self._key, conn)

    def _abandon(self) -> None:
        conn = self._conn
        if conn is not None and not conn.codec.done:
            conn.close()  # abandoned mid-body: never reuse
        self._finish()
