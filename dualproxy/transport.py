"""Fast HTTP/1.1 transports under httpx: one async (asyncio), one sync (sockets).

httpx's default transports (httpcore + h11 + anyio) cost a proxy most of its
CPU per request. These speak HTTP/1.1 with the small codec in `h1`, keep a
connection pool per origin, and keep every rule the suite checks:

- the request line carries `extensions["target"]` as-is and the headers are
  sent exactly as given (the core already wrote Host and framing);
- timeouts come from `extensions["timeout"]`, read again before every wait, so
  the core can switch from the head timeout to the idle timeout mid-response;
- an exception from the request body iterator propagates unchanged and the
  connection is closed with the body unfinished;
- an upstream that answers before reading the whole upload gets its answer
  relayed (sending stops);
- a connection is reused only after a cleanly framed, fully read response with
  no stray bytes, and never after `Connection: close` (either side), a 101, a
  cut upload or a head with both framing headers; otherwise it is closed (no
  response-queue poisoning); a request body that over- or under-runs its
  Content-Length is a LocalProtocolError, never a completed upload;
- a request that failed on a *reused* connection before any response byte is
  retried once on a fresh one, only when it has no body and an idempotent
  method;
- the sync transport, given a `ClientWatch` in `extensions["dualproxy.client"]`,
  gives up waiting for the head as soon as the client is gone
  (ClientDisconnected): WSGI itself has no disconnect signal.
"""

from __future__ import annotations

import asyncio
import collections
import os
import select
import socket
import ssl
import struct
import sys
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import Any, cast

import httpx

from . import h1
from .errors import ClientDisconnected

READ_SIZE = 262144
SMALL_READ = 65536          # below malloc's mmap threshold: no mmap/munmap per small read
HIGH_WATER = 1 << 20        # pause reading the upstream above this many buffered bytes
CLIENT_WATCH = "dualproxy.client"  # request extension holding a ClientWatch
# Linux reports a peer's FIN as POLLRDHUP without reading (pipelined bytes do
# not raise it); elsewhere only a reset (POLLHUP/POLLERR) is seen.
_POLLRDHUP = getattr(select, "POLLRDHUP", 0)
_GONE_EVENTS = _POLLRDHUP | select.POLLHUP | select.POLLERR
_EVENT_SLICE = 0.05  # how often an event-only watch is looked at while waiting
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
Key = tuple[str, str, int]


def _timeout(request: httpx.Request, kind: str) -> float | None:
    timeouts = request.extensions.get("timeout")
    if isinstance(timeouts, dict):
        value = timeouts.get(kind)
        return None if value is None else float(value)
    return None


def _limit(value: int | None) -> int:
    return sys.maxsize if value is None else value  # None: no limit (httpx.Limits)


def _origin(request: httpx.Request) -> Key:
    url = request.url
    scheme = url.scheme
    port = url.port or (443 if scheme == "https" else 80)
    return scheme, url.host, port


def _target(request: httpx.Request) -> bytes:
    target = request.extensions.get("target")
    return target if isinstance(target, bytes) else request.url.raw_path


def _response(head: h1.Head, stream: Any, request: httpx.Request) -> httpx.Response:
    return httpx.Response(
        head.status, headers=head.headers, stream=stream, request=request,
        extensions={"http_version": head.version, "reason_phrase": head.reason},
    )


def _overrun() -> httpx.LocalProtocolError:
    return httpx.LocalProtocolError("request body longer than its Content-Length")


def _frame(piece: bytes, chunked: bool, left: int) -> tuple[bytes, int]:
    """Wire bytes for one non-empty upload piece and the Content-Length still owed.

    A piece that overruns the declared length raises before a byte of it is sent.
    """
    if chunked:
        return b"%x\r\n%b\r\n" % (len(piece), piece), left
    left -= len(piece)
    if left < 0:
        raise _overrun()
    return piece, left


def _underrun() -> httpx.LocalProtocolError:
    return httpx.LocalProtocolError("request body shorter than its Content-Length")


class _Retry(Exception):
    """A reused connection died before answering: try once more on a fresh one."""


class _Slots:
    """Counts connections per pool; waiters queue for a free slot (PoolTimeout after)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0


# -- async ----------------------------------------------------------------------------


def _expire(waiter: asyncio.Future[None]) -> None:
    # A timeout is an exception on the waiter, never a task cancellation, so a
    # real cancellation (client gone) stays distinguishable.
    if not waiter.done():
        waiter.set_exception(httpx.ReadTimeout("timed out waiting for the upstream"))


class _AsyncConn(asyncio.Protocol):
    """One upstream connection: a buffer fed by the event loop and one waiter."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.eof = False
        self.error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._paused = False
        self.reused = False
        self.close_after = False
        # While a Content-Length or close-delimited body streams, whole reads
        # queue here as the event loop delivered them and go on to the client
        # uncopied; `buf` (always older bytes than the queue) is drained first.
        self.queue: collections.deque[bytes] | None = None
        self.queued = 0

    # protocol callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; same interface.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def data_received(self, data: bytes) -> None:
        queue = self.queue
        if queue is not None and not self.buf:
            queue.append(data)
            self.queued += len(data)
        else:
            self.buf += data
        if (len(self.buf) + self.queued > HIGH_WATER and self.transport is not None
                and not self._paused):
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.error = exc
        self._wake()
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    def pause_writing(self) -> None:
        self._drain = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # driver side
    @property
    def closed(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def usable(self) -> bool:
        return not self.closed and not self.eof and not self.buf and not self.queue

    def consumed(self) -> None:
        if (self._paused and len(self.buf) + self.queued < HIGH_WATER // 4
                and self.transport is not None):
            self._paused = False
            self.transport.resume_reading()

    async def wait_data(self, timeout: float | None) -> None:
        """Wait until more bytes (or EOF) arrive; ReadTimeout after `timeout`."""
        if self.eof:
            return
        self.consumed()
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        handle = (loop.call_later(timeout, _expire, waiter)
                  if timeout is not None else None)
        try:
            await waiter
        finally:
            self._waiter = None
            if handle is not None:
                handle.cancel()

    async def write(self, data: bytes, timeout: float | None) -> None:
        if self.closed:
            raise httpx.WriteError("upstream connection closed")
        assert self.transport is not None
        self.transport.write(data)
        if self.transport.is_closing():
            # The write failed (an upstream that answered early and reset us).
            # The event loop drops the socket without reading what is still in
            # the kernel's queue: that is the answer, so salvage it first.
            self._salvage()
            raise httpx.WriteError("upstream connection closed")
        drain = self._drain
        if drain is not None:
            try:
                await asyncio.wait_for(asyncio.shield(drain), timeout)
            except asyncio.TimeoutError:
                raise httpx.WriteTimeout("upstream stopped reading the request") from None

    def _salvage(self) -> None:
        transport = self.transport
        sock = transport.get_extra_info("socket") if transport else None
        if sock is None or transport is None or transport.get_extra_info("sslcontext"):
            return  # with TLS the kernel's bytes are records, not the answer
        try:
            dup = socket.socket(fileno=os.dup(sock.fileno()))
        except OSError:
            return
        with dup:
            dup.setblocking(False)
            while True:
                try:
                    data = dup.recv(READ_SIZE)
                except OSError:
                    break
                if not data:
                    break
                self.buf += data

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class AsyncUpstreamTransport(httpx.AsyncBaseTransport):
    """The async transport dualproxy's AsyncProxy uses by default."""

    def __init__(self, *, max_connections: int | None = 100,
                 max_keepalive_connections: int | None = 100,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self._slots = _Slots(_limit(max_connections))
        self._max_idle = _limit(max_keepalive_connections)
        self._idle: dict[Key, collections.deque[_AsyncConn]] = {}
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._ssl = ssl_context

    async def _acquire(self, timeout: float | None) -> None:
        slots = self._slots
        if slots.used < slots.limit and not self._waiters:
            slots.used += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
        except asyncio.TimeoutError:
            raise httpx.PoolTimeout("no upstream connection became free") from None
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._release()  # the slot was handed to us as we were cancelled
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # hand the slot over
                return
        self._slots.used -= 1

    async def _connect(self, key: Key, request: httpx.Request) -> _AsyncConn:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.usable():
                conn.reused = True
                return conn
            conn.close()
        scheme, host, port = key
        loop = asyncio.get_running_loop()
        context = None
        if scheme == "https":
            context = self._ssl = self._ssl or ssl.create_default_context()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(_AsyncConn, host, port, ssl=context,
                                       server_hostname=host if context else None),
                _timeout(request, "connect"))
        except asyncio.TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out") from None
        except OSError as exc:
            raise httpx.ConnectError(f"{host}:{port}: {exc}") from exc
        return conn

    async def aclose(self) -> None:
        """Close the idle connections (those in use close with their responses)."""
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()

    def _checkin(self, key: Key, conn: _AsyncConn, reusable: bool) -> None:
        idle = self._idle.setdefault(key, collections.deque())
        if reusable and conn.usable() and len(idle) < self._max_idle:
            conn.reused = False
            conn.buf = bytearray()  # an emptied bytearray keeps its capacity: drop it
            conn.queue = None
            idle.append(conn)
        else:
            conn.close()
        self._release()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        key = _origin(request)
        await self._acquire(_timeout(request, "pool"))
        try:
            conn = await self._connect(key, request)
        except BaseException:
            self._release()
            raise
        try:
            head = await self._exchange(conn, request)
        except _Retry:
            conn.close()
            try:
                conn = await self._connect(key, request)
                head = await self._exchange(conn, request, retry=False)
            except BaseException:
                conn.close()
                self._release()
                raise
        except BaseException:
            conn.close()
            self._release()
            raise
        decoder = h1.BodyDecoder(head)
        if decoder.done:
            self._checkin(key, conn, head.reusable and not conn.close_after)
            return _response(head, _Empty(), request)
        return _response(head, _AsyncBody(self, key, conn, head, decoder, request), request)

    async def _exchange(self, conn: _AsyncConn, request: httpx.Request,
                        retry: bool = True) -> h1.Head:
        method = request.method.encode()
        headers = request.headers.raw
        framing, length, keep = h1.request_framing(headers)
        if not keep:
            conn.close_after = True
        write_timeout = _timeout(request, "write")
        head_bytes = h1.build_request_head(method, _target(request), headers)
        stream = request.stream
        try:
            await conn.write(head_bytes, write_timeout)
        except httpx.WriteError:
            if retry and conn.reused and framing == h1.NONE and method in _IDEMPOTENT:
                raise _Retry() from None
            raise
        if framing != h1.NONE:
            assert isinstance(stream, AsyncIterable)
            await self._send_body(conn, stream, framing == h1.CHUNKED, length, write_timeout)
        while True:
            head = h1.parse_head(conn.buf, method) if conn.buf else None
            if head is None:
                if conn.eof:
                    if (retry and conn.reused and not conn.buf and framing == h1.NONE
                            and method in _IDEMPOTENT):
                        raise _Retry()
                    raise httpx.RemoteProtocolError("upstream closed without a response")
                await conn.wait_data(_timeout(request, "read"))
                continue
            if 100 <= head.status < 200 and head.status != 101:
                continue  # interim responses (100 Continue, 103 Early Hints)
            return head

    async def _send_body(self, conn: _AsyncConn, stream: AsyncIterable[bytes],
                         chunked: bool, length: int, timeout: float | None) -> None:
        left = length
        async for piece in stream:
            if conn.buf or conn.eof:
                # The upstream answered (or left) before the upload ended: stop
                # sending; the connection can never be reused now.
                conn.close_after = True
                return
            if not piece:
                continue
            data, left = _frame(piece, chunked, left)
            try:
                await conn.write(data, timeout)
            except httpx.WriteError:
                conn.close_after = True
                return  # try to read an early answer; none → protocol error later
        if chunked:
            if not conn.eof:
                await conn.write(b"0\r\n\r\n", timeout)
        elif left:
            raise _underrun()


class _Empty(httpx.AsyncByteStream, httpx.SyncByteStream):
    def __iter__(self) -> Iterator[bytes]:
        return iter(())

    async def __aiter__(self) -> AsyncIterator[bytes]:
        empty: tuple[bytes, ...] = ()
        for piece in empty:
            yield piece


class _AsyncBody(httpx.AsyncByteStream):
    def __init__(self, pool: AsyncUpstreamTransport, key: Key, conn: _AsyncConn,
                 head: h1.Head, decoder: h1.BodyDecoder, request: httpx.Request) -> None:
        self._pool = pool
        self._key = key
        self._conn: _AsyncConn | None = conn
        self._head = head
        self._decoder = decoder
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn = self._conn
        decoder = self._decoder
        if conn is None:
            return
        if decoder.whole_reads:
            conn.queue = collections.deque()
        while True:
            queue = conn.queue
            if queue and not conn.buf:
                piece = queue.popleft()
                conn.queued -= len(piece)
                data, stray = decoder.take(piece)
                if stray:
                    conn.buf += stray  # bytes past the body: the connection is not reused
            else:
                data = decoder.feed(conn.buf, conn.eof)
            if decoder.done:
                # Finished cleanly: back to the pool before the last piece goes out,
                # so the client's next request (sent the moment it has this piece)
                # finds the connection idle.
                self._finish()
                if data:
                    yield data
                return
            if data:
                yield data
            elif conn.eof:
                raise httpx.RemoteProtocolError("upstream closed mid-body")
            else:
                await conn.wait_data(_timeout(self._request, "read"))

    def _finish(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            reusable = self._decoder.done and self._head.reusable and not conn.close_after
            self._pool._checkin(self._key, conn, reusable)

    async def aclose(self) -> None:
        conn = self._conn
        if conn is not None and not self._decoder.done:
            conn.close()  # abandoned mid-body: never reuse
        self._finish()


# -- sync -------------------------------------------------------------------------------


def _timeval(timeout: float | None) -> bytes:
    # struct timeval; zero means "no timeout" to the kernel, so a zero timeout
    # becomes the shortest one instead.
    if timeout is None:
        return struct.pack("ll", 0, 0)
    usec = max(int(timeout * 1e6), 1)
    return struct.pack("ll", usec // 1000000, usec % 1000000)


class _SyncConn:
    """One upstream socket with its read buffer.

    A plain TCP socket stays in blocking mode with the kernel's SO_RCVTIMEO /
    SO_SNDTIMEO set only when the value changes: Python's own socket timeouts
    cost an ioctl per settimeout() and a poll() before every send and recv,
    and each extra call releases the GIL, which 32 gthread workers fight over.
    TLS sockets keep Python's timeouts (the kernel's would surface mid-record).
    """

    __slots__ = ("sock", "buf", "eof", "reused", "close_after", "tls", "_rcv", "_snd",
                 "_read_size")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.eof = False
        self.reused = False
        self.close_after = False
        self.tls = isinstance(sock, ssl.SSLSocket)
        self._rcv: float | None = -1.0
        self._snd: float | None = -1.0
        self._read_size = SMALL_READ
        if not self.tls:
            sock.settimeout(None)

    def _recv_timeout(self, timeout: float | None) -> None:
        if self.tls:
            self.sock.settimeout(timeout)
        elif timeout != self._rcv:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(timeout))
            self._rcv = timeout

    def _send_timeout(self, timeout: float | None) -> None:
        if self.tls:
            self.sock.settimeout(timeout)
        elif timeout != self._snd:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(timeout))
            self._snd = timeout

    def readable(self) -> bool:
        """Bytes or EOF waiting right now? (poll, not select: any fd number works)"""
        sock = self.sock
        if self.tls and cast(ssl.SSLSocket, sock).pending():
            return True
        poller = select.poll()
        try:
            poller.register(sock, select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True

    def usable(self) -> bool:
        # readable while idle means EOF or stray bytes: never reuse that
        return not (self.eof or self.buf or self.readable())

    def read_more(self, timeout: float | None) -> None:
        self._recv_timeout(timeout)
        size = self._read_size
        try:
            data = self.sock.recv(size)
        except (TimeoutError, BlockingIOError):  # BlockingIOError: SO_RCVTIMEO expired
            raise httpx.ReadTimeout("timed out waiting for the upstream") from None
        except OSError as exc:
            if isinstance(exc, ConnectionResetError) and not self.buf:
                self.eof = True
                return
            raise httpx.ReadError(str(exc)) from exc
        if data:
            self.buf += data
            # A full read means a big body is flowing: read more at a time.
            self._read_size = READ_SIZE if len(data) == size else SMALL_READ
        else:
            self.eof = True

    def answered(self) -> bool:
        """Has the upstream sent something (an early answer) while we upload?"""
        return bool(self.buf) or self.readable()

    def write(self, data: bytes, timeout: float | None) -> None:
        self._send_timeout(timeout)
        try:
            self.sock.sendall(data)
        except (TimeoutError, BlockingIOError):  # BlockingIOError: SO_SNDTIMEO expired
            raise httpx.WriteTimeout("upstream stopped reading the request") from None
        except OSError as exc:
            raise httpx.WriteError(str(exc)) from exc

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class ClientWatch:
    """Tells the sync transport, while it waits for the upstream's head, that the client left.

    `sock`: the client's socket (gunicorn puts it in the environ); its FIN or
    reset ends the wait, as nginx ends a request whose client closed. `gone`: an
    event a server bridge sets on disconnect (looked at every 50 ms while waiting).
    """

    __slots__ = ("sock", "gone")

    def __init__(self, sock: socket.socket | None = None,
                 gone: threading.Event | None = None) -> None:
        self.sock = sock
        self.gone = gone

    def wait(self, conn: _SyncConn, timeout: float | None) -> None:
        """Return once `conn` has bytes (or EOF) to read; raise if the client left first."""
        if conn.tls and cast(ssl.SSLSocket, conn.sock).pending():
            return
        poller = select.poll()
        try:
            upstream_fd = conn.sock.fileno()
            poller.register(upstream_fd, select.POLLIN)
            if self.sock is not None and self.sock.fileno() >= 0:
                poller.register(self.sock, _GONE_EVENTS)
        except (OSError, ValueError):
            return  # a closed socket: let the read itself report it
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.gone is not None and self.gone.is_set():
                raise ClientDisconnected("the client went away before the response head")
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise httpx.ReadTimeout("timed out waiting for the upstream")
            if self.gone is not None:
                left = _EVENT_SLICE if left is None else min(left, _EVENT_SLICE)
            events = poller.poll(None if left is None else max(int(left * 1000), 1))
            for fd, _ in events:
                if fd == upstream_fd:
                    return
                raise ClientDisconnected("the client went away before the response head")


def connect_tcp(host: str, port: int, timeout: float | None) -> socket.socket:
    """A blocking TCP connection with Nagle off; httpx's ConnectTimeout/ConnectError on failure."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except TimeoutError:
        raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out") from None
    except OSError as exc:
        raise httpx.ConnectError(f"{host}:{port}: {exc}") from exc
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class UpstreamTransport(httpx.BaseTransport):
    """The sync transport dualproxy's SyncProxy uses by default (thread-safe)."""

    def __init__(self, *, max_connections: int | None = 100,
                 max_keepalive_connections: int | None = 100,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self._limit = _limit(max_connections)
        self._used = 0
        self._max_idle = _limit(max_keepalive_connections)
        self._idle: dict[Key, list[_SyncConn]] = {}
        self._cond = threading.Condition()
        self._ssl = ssl_context

    def _acquire(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._used >= self._limit:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise httpx.PoolTimeout("no upstream connection became free")
                self._cond.wait(remaining)
            self._used += 1

    def _release(self) -> None:
        with self._cond:
            self._used -= 1
            self._cond.notify()

    def _connect(self, key: Key, request: httpx.Request) -> _SyncConn:
        with self._cond:
            idle = self._idle.get(key)
            conn = idle.pop() if idle else None
        while conn is not None:
            if conn.usable():
                conn.reused = True
                return conn
            conn.close()
            with self._cond:
                idle = self._idle.get(key)
                conn = idle.pop() if idle else None
        scheme, host, port = key
        sock = connect_tcp(host, port, _timeout(request, "connect"))
        if scheme == "https":
            with self._cond:
                context = self._ssl = self._ssl or ssl.create_default_context()
            try:
                sock = context.wrap_socket(sock, server_hostname=host)
            except OSError as exc:
                sock.close()
                raise httpx.ConnectError(f"TLS with {host}:{port} failed: {exc}") from exc
        return _SyncConn(sock)

    def close(self) -> None:
        """Close the idle connections (those in use close with their responses)."""
        with self._cond:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()

    def _checkin(self, key: Key, conn: _SyncConn, reusable: bool) -> None:
        keep = reusable and not conn.close_after and not conn.buf and not conn.eof
        with self._cond:
            idle = self._idle.setdefault(key, [])
            if keep and len(idle) < self._max_idle:
                conn.reused = False
                conn.buf = bytearray()  # an emptied bytearray keeps its capacity: drop it
                idle.append(conn)
                conn = None  # type: ignore[assignment]
            self._used -= 1
            self._cond.notify()
        if conn is not None:
            conn.close()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        key = _origin(request)
        self._acquire(_timeout(request, "pool"))
        conn: _SyncConn | None = None
        try:
            conn = self._connect(key, request)
            try:
                head = self._exchange(conn, request)
            except _Retry:
                conn.close()
                conn = self._connect(key, request)
                head = self._exchange(conn, request, retry=False)
        except BaseException:
            if conn is not None:
                conn.close()
            self._release()
            raise
        decoder = h1.BodyDecoder(head)
        if decoder.done:
            self._checkin(key, conn, head.reusable and not conn.close_after)
            return _response(head, _Empty(), request)
        return _response(head, _SyncBody(self, key, conn, head, decoder, request), request)

    def _exchange(self, conn: _SyncConn, request: httpx.Request, retry: bool = True) -> h1.Head:
        method = request.method.encode()
        headers = request.headers.raw
        framing, length, keep = h1.request_framing(headers)
        if not keep:
            conn.close_after = True
        write_timeout = _timeout(request, "write")
        head_bytes = h1.build_request_head(method, _target(request), headers)
        watch = request.extensions.get(CLIENT_WATCH)
        try:
            conn.write(head_bytes, write_timeout)
        except httpx.WriteError:
            if retry and conn.reused and framing == h1.NONE and method in _IDEMPOTENT:
                raise _Retry() from None
            raise
        if framing != h1.NONE:
            stream = request.stream
            assert isinstance(stream, Iterable)
            self._send_body(conn, stream, framing == h1.CHUNKED, length, write_timeout)
        while True:
            head = h1.parse_head(conn.buf, method) if conn.buf else None
            if head is None:
                if conn.eof:
                    if (retry and conn.reused and not conn.buf and framing == h1.NONE
                            and method in _IDEMPOTENT):
                        raise _Retry()
                    raise httpx.RemoteProtocolError("upstream closed without a response")
                read_timeout = _timeout(request, "read")
                if watch is not None:
                    watch.wait(conn, read_timeout)
                conn.read_more(read_timeout)
                continue
            if 100 <= head.status < 200 and head.status != 101:
                continue
            return head

    def _send_body(self, conn: _SyncConn, stream: Iterable[bytes], chunked: bool,
                   length: int, timeout: float | None) -> None:
        left = length
        for piece in stream:
            if conn.answered():
                conn.close_after = True  # early answer: stop uploading, never reuse
                return
            if not piece:
                continue
            data, left = _frame(piece, chunked, left)
            try:
                conn.write(data, timeout)
            except httpx.WriteError:
                conn.close_after = True
                return  # try to read an early answer; none → protocol error below
        if chunked:
            conn.write(b"0\r\n\r\n", timeout)
        elif left:
            raise _underrun()


class _SyncBody(httpx.SyncByteStream):
    def __init__(self, pool: UpstreamTransport, key: Key, conn: _SyncConn, head: h1.Head,
                 decoder: h1.BodyDecoder, request: httpx.Request) -> None:
        self._pool = pool
        self._key = key
        self._conn: _SyncConn | None = conn
        self._head = head
        self._decoder = decoder
        self._request = request

    def __iter__(self) -> Iterator[bytes]:
        conn = self._conn
        decoder = self._decoder
        if conn is None:
            return
        while True:
            data = decoder.feed(conn.buf, conn.eof)
            if decoder.done:
                self._finish()  # back to the pool before the last piece (see _AsyncBody)
                if data:
                    yield data
                return
            if data:
                yield data
            elif conn.eof:
                raise httpx.RemoteProtocolError("upstream closed mid-body")
            else:
                conn.read_more(_timeout(self._request, "read"))

    def _finish(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool._checkin(self._key, conn, self._decoder.done and self._head.reusable)

    def close(self) -> None:
        conn = self._conn
        if conn is not None and not self._decoder.done:
            conn.close()
            conn.eof = True
        self._finish()
