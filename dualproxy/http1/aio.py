"""The async driver: an asyncio Protocol per upstream connection, a pool, the httpx transport.

It only moves bytes between the event loop and a `ClientConnection` and waits;
the codec decides (see `pool` for the rules kept). Bytes the event loop
delivers go straight into the codec, so whole reads of a Content-Length or
close-delimited body reach the client uncopied.
"""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import ssl
from collections.abc import AsyncIterable, AsyncIterator
from typing import cast

import httpx

from ..waits import LazyTimer, within
from .connect import Key, address, connect_failed
from .connection import NEED_DATA, ClientConnection, Data, Response
from .pool import (
    RETRY_ON,
    Call,
    Pool,
    PooledBody,
    Reply,
    Sendable,
    connect_timeout,
    head_deadline,
    tell_unsent,
    timeout,
    to_httpx,
)

READ_SIZE = 262144
HIGH_WATER = 1 << 20  # pause reading the upstream above this many unread bytes


_TLS_CUT = "TLS closed without close_notify"


def _tls_cut(transport: asyncio.BaseTransport) -> bool:
    """Did a TLS stream end without close_notify? asyncio and uvloop report such a
    cut as a plain end; the TLS object still tells: after close_notify a read gives
    b"" or SSLZeroReturnError, after a cut it wants more bytes."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return False
    try:
        return bool(ssl_object.read(1))  # nothing is left unread at EOF: b""
    except ssl.SSLZeroReturnError:  # close_notify, and ours sent (3.10 unwrapped)
        return False
    except ssl.SSLError:  # SSLWantReadError: no close_notify came
        return True


class _AsyncConn(asyncio.Protocol):
    """One upstream connection: its codec, fed by the event loop, and one waiter."""

    def __init__(self) -> None:
        self.codec = ClientConnection()
        self.transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Future[None] | None = None
        # The read timeout (`wait_data`): its deadline is set for a wait and cleared
        # when bytes come, on one lazy timer (a wait costs no timer of its own).
        self._reads: LazyTimer
        self._drain: asyncio.Future[None] | None = None
        self._paused = False
        self._tls = False
        self._eof = False

    # protocol callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; same interface.
        self.transport = cast(asyncio.Transport, transport)
        self._loop = asyncio.get_running_loop()  # once a connection, not a wait
        self._reads = LazyTimer(self._loop, self._timed_out)
        self._tls = transport.get_extra_info("sslcontext") is not None
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family != socket.AF_UNIX:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def data_received(self, data: bytes) -> None:
        codec = self.codec
        codec.receive_data(data)
        if codec.pending > HIGH_WATER and self.transport is not None and not self._paused:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._end()
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._reads.stop()
        if exc is not None:  # a reset: never the clean end a close-delimited body needs
            self.codec.connection_broken(str(exc) or type(exc).__name__)
        elif not self._eof:
            self._end()
        self._wake()
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    def _end(self) -> None:
        # Over TLS the end may be a cut. asyncio 3.11+ reports one as EOF, uvloop and
        # asyncio 3.10 as a close without EOF (3.10 reports close_notify so too).
        if self._tls and self.transport is not None and _tls_cut(self.transport):
            self.codec.connection_broken(_TLS_CUT)
        else:
            self.codec.receive_data(b"")

    def pause_writing(self) -> None:
        self._drain = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = self._reads.deadline = None
            if not waiter.done():
                waiter.set_result(None)

    # driver side
    @property
    def closed(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def wait_data(self, request: Sendable,
                  deadline: float | None = None) -> asyncio.Future[None] | None:
        """A future to await for more bytes (or EOF); it fails with ReadTimeout after
        the read timeout, or at `deadline` (the loop's clock) when given. None when
        the stream ended (nothing to wait for). A future, not a coroutine: the
        caller awaits it directly (a frame less a wait)."""
        if self.codec.eof:
            return None
        if self.codec.pending < HIGH_WATER // 4:
            self.resume()
        loop = self._loop or asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        if deadline is None:
            seconds = timeout(request, "read")
            if seconds is None:
                self._reads.deadline = None
            else:
                self._reads.set(loop.time() + seconds)
        else:
            self._reads.set(deadline)
        return waiter

    def _timed_out(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(httpx.ReadTimeout("timed out waiting for the upstream"))

    def resume(self) -> None:
        """Read again if paused: a pooled connection must see its upstream close it."""
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def put(self, data: bytes | tuple[bytes, ...]) -> bool:
        """Write (parts: in one gathering write); True when the kernel's buffer is full
        and `drained` is to be awaited before more. An upstream that left is told to
        the codec (which stops the upload), not raised: its answer may be in."""
        transport = self.transport
        if transport is None or transport.is_closing():
            self.codec.write_failed(nothing_written=True)
            return False
        if isinstance(data, tuple):
            if type(transport).__module__.startswith("uvloop"):
                transport.writelines(data)  # one writev, the parts uncopied
            else:
                # asyncio's own writelines (CPython 3.12, 3.13) never calls the
                # protocol's pause_writing however much it buffers: the upload
                # would lose its backpressure and its write timeout.
                transport.write(b"".join(data))
        else:
            transport.write(data)
        if transport.is_closing():
            # The write failed (an upstream that answered early and reset us).
            # The event loop drops the socket without reading what is still in
            # the kernel's queue: that is the answer, so salvage it first.
            self._salvage(transport)
            self.codec.write_failed()
            return False
        return self._drain is not None

    async def drained(self, request: Sendable) -> None:
        """Wait for the kernel to take what was written (after `put` said so)."""
        drain = self._drain
        if drain is not None:
            try:
                await within(asyncio.shield(drain), timeout(request, "write"), self._loop)
            except asyncio.TimeoutError:
                raise httpx.WriteTimeout("upstream stopped reading the request") from None

    async def write(self, data: bytes | tuple[bytes, ...], request: Sendable) -> None:
        """Write and wait for the kernel to take it (`put`, then `drained`)."""
        if self.put(data):
            await self.drained(request)

    def _salvage(self, transport: asyncio.Transport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is None or transport.get_extra_info("sslcontext"):
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
                self.codec.receive_data(data)

    def close(self) -> None:
        self._reads.stop()
        if self.transport is not None:
            self.transport.abort()


class AsyncUpstreamTransport(Pool["_AsyncConn"], httpx.AsyncBaseTransport):
    """The async transport dualproxy's AsyncProxy uses by default."""

    def _init_waiting(self) -> None:
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def _acquire(self, seconds: float | None) -> None:
        if self._used < self._limit and not self._waiters:
            self._used += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            # A slot handed over in the loop step the timeout fires in is kept (an
            # owned wait: the timeout is set on the waiter only if it is not done);
            # Python 3.12's wait_for turned it into a TimeoutError, the slot lost.
            await within(waiter, seconds, owned=True)
        except asyncio.TimeoutError:
            raise httpx.PoolTimeout("no upstream connection became free") from None
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
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
        self._used -= 1

    async def _connect(self, key: Key, request: Sendable, fresh: bool,
                       deadline: float | None) -> _AsyncConn:
        if not fresh and (idle := self._take_idle(key)) is not None:
            return idle
        scheme, host, port = key
        loop = asyncio.get_running_loop()
        context = self._context(key)
        try:
            if scheme == "unix":
                opening = loop.create_unix_connection(_AsyncConn, host)
            else:
                opening = loop.create_connection(_AsyncConn, host, port, ssl=context,
                                                 server_hostname=host if context else None)
            seconds = connect_timeout(request, deadline, loop.time())
            # Awaited in this task (waits.within, not wait_for): a cancel that comes
            # as the connection opens is raised inside the loop's connect, which
            # closes the new connection itself.
            _, conn = await within(opening, seconds, loop)
        except asyncio.TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {address(key)} timed out") from None
        except OSError as exc:
            raise connect_failed(key, exc) from exc
        return conn

    async def aclose(self) -> None:
        """Close the idle connections; those in use close when they come back."""
        for conn in self._idle.drain():
            conn.close()

    def _checkin(self, key: Key, conn: _AsyncConn) -> None:
        if conn.closed or not conn.codec.reusable or not self._idle.put(key, conn):
            conn.close()
        else:
            conn.resume()  # paused by the body's last read: it would never see EOF
        self._release()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        answer = await self.send(Call.of(request))
        return to_httpx(answer.head, answer.stream, request)

    async def send(self, call: Call) -> Reply:
        """Send `call`; its final response head and body stream (httpx's errors).
        The faces call it directly, without an httpx.Request and Response.
        The common steps (a free slot, an idle connection, no body) await nothing
        but the upstream's bytes."""
        key = call.key
        if self._used < self._limit and not self._waiters:  # `_acquire`'s first step
            self._used += 1
        else:
            await self._acquire(timeout(call, "pool"))
        conn: _AsyncConn | None = None
        try:
            loop = asyncio.get_running_loop()
            deadline = head_deadline(call, loop.time())
            conn = self._take_idle(key)
            retry = True  # once, on a new connection, when the codec says it may
            while True:
                if conn is None:
                    conn = await self._connect(key, call, True, deadline)
                # The exchange: the request out, then the final head in (inline: no
                # coroutine of its own for the common steps).
                codec = conn.codec
                try:
                    if conn.put(codec.send_request(call.method, call.target, call.headers)):
                        await conn.drained(call)
                    head_by = deadline
                    if codec.expects_body:
                        await self._upload(conn, call)
                        head_by = head_deadline(call, loop.time())
                    while True:
                        event = codec.next_event()
                        if event is NEED_DATA:
                            waiter = conn.wait_data(call, head_by)
                            if waiter is not None:
                                await waiter
                        elif isinstance(event, Response) and not event.interim:
                            break
                    head = event
                    break
                except RETRY_ON:
                    conn.close()
                    if not retry or not codec.may_retry():
                        raise
                    retry, conn = False, None
        except BaseException as exc:
            if conn is not None:
                conn.close()
            tell_unsent(exc, conn)
            self._release()
            raise
        return Reply(head, self._body(key, conn, call, AsyncBody))

    def _take_idle(self, key: Key) -> _AsyncConn | None:
        """An idle connection to `key` that may carry a request, or None (the
        unusable ones found on the way are closed)."""
        while (idle := self._idle.take(key)) is not None:
            if not idle.closed and idle.codec.reusable:
                return idle
            idle.close()
        return None

    @staticmethod
    async def _upload(conn: _AsyncConn, call: Call) -> None:
        """The request's body out, until its end or the codec stops the upload."""
        codec = conn.codec
        stream = call.stream
        assert isinstance(stream, AsyncIterable)
        async for piece in stream:
            parts = codec.send_body_parts(piece)
            if parts:
                await conn.write(parts, call)
            elif codec.upload_stopped:
                break
        else:
            data = codec.end_body()
            if data:
                await conn.write(data, call)


class AsyncBody(PooledBody[_AsyncConn], httpx.AsyncByteStream):
    """A response body of the async transport. `ended` tells, as a piece is handed
    out, that it is the last one (the message complete by its framing)."""

    @property
    def ended(self) -> bool:
        return self._conn is None

    def piece(self) -> bytes | None:
        """The next piece of the body when it is at hand: b"" once it ended, None
        when the upstream's next bytes are to be awaited first (`more`)."""
        conn = self._conn
        if conn is None:
            return b""
        codec = conn.codec
        while True:
            event = codec.next_event()
            if event.__class__ is Data:
                if codec.done:
                    # Back to the pool before the last piece goes out, so the
                    # client's next request (sent the moment it has this piece)
                    # finds the connection idle.
                    self._finish()
                data: bytes = event.data
                if data or self._conn is None:
                    return data
            elif event is NEED_DATA:
                return None
            else:
                self._finish()
                return b""

    def more(self) -> asyncio.Future[None] | None:
        """What to await for the upstream's next bytes (`piece` said None): a future,
        or None when there is nothing to wait for (the next `piece` tells)."""
        conn = self._conn
        return None if conn is None else conn.wait_data(self._request)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            piece = self.piece()
            if piece is None:
                waiter = self.more()
                if waiter is not None:
                    await waiter
            elif piece:
                yield piece
            else:
                return

    def abandon(self) -> None:
        """`aclose`, as a plain call: the connection back to the pool, or closed."""
        self._abandon()

    async def aclose(self) -> None:
        self._abandon()
