"""The sync driver: blocking sockets, a thread-safe pool, the client watch, the httpx transport.

It only moves bytes between a socket and a `ClientConnection` and waits; the
codec decides (see `pool` for the rules kept). Given a `ClientWatch` in
`extensions["dualproxy.client"]`, it gives up waiting for the head as soon as
the client is gone (ClientDisconnected): WSGI itself has no disconnect signal.
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from typing import cast

import httpx

from ..errors import ClientDisconnected, ShuttingDown
from .connect import Key, address, connect_failed
from .connection import NEED_DATA, ClientConnection, Data, EndOfMessage, Response
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
    time_left,
    timeout,
    to_httpx,
)

READ_SIZE = 262144
SMALL_READ = 65536          # below malloc's mmap threshold: no mmap/munmap per small read
CLIENT_WATCH = "dualproxy.client"  # request extension holding a ClientWatch
# Linux reports a peer's FIN as POLLRDHUP without reading (pipelined bytes do
# not raise it); elsewhere only a reset (POLLHUP/POLLERR) is seen.
_POLLRDHUP = getattr(select, "POLLRDHUP", 0)
_GONE_EVENTS = _POLLRDHUP | select.POLLHUP | select.POLLERR
_EVENT_SLICE = 0.05  # how often an event-only watch is looked at while waiting


def _timeval(seconds: float | None) -> bytes:
    # struct timeval; zero means "no timeout" to the kernel, so a zero timeout
    # becomes the shortest one instead.
    if seconds is None:
        return struct.pack("ll", 0, 0)
    usec = max(int(seconds * 1e6), 1)
    return struct.pack("ll", usec // 1000000, usec % 1000000)


class _SyncConn:
    """One upstream socket and its codec.

    A plain TCP socket stays in blocking mode with the kernel's SO_RCVTIMEO /
    SO_SNDTIMEO set only when the value changes: Python's own socket timeouts
    cost an ioctl per settimeout() and a poll() before every send and recv,
    and each extra call releases the GIL, which 32 gthread workers fight over.
    TLS sockets keep Python's timeouts (the kernel's would surface mid-record).
    """

    __slots__ = ("sock", "codec", "tls", "_rcv", "_snd", "_read_size")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.codec = ClientConnection()
        self.tls = isinstance(sock, ssl.SSLSocket)
        self._rcv: float | None = -1.0
        self._snd: float | None = -1.0
        self._read_size = SMALL_READ
        if not self.tls:
            sock.settimeout(None)

    def _set_timeout(self, option: int, seconds: float | None) -> None:
        if self.tls:
            self.sock.settimeout(seconds)
        elif seconds != (self._rcv if option == socket.SO_RCVTIMEO else self._snd):
            self.sock.setsockopt(socket.SOL_SOCKET, option, _timeval(seconds))
            if option == socket.SO_RCVTIMEO:
                self._rcv = seconds
            else:
                self._snd = seconds

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
        return self.codec.reusable and not self.readable()

    def read(self, request: Sendable | None, deadline: float | None = None,
             ready: bool = False) -> None:
        """Feed the codec one read; `request` None: only what is there now. The wait
        is the read timeout, or until `deadline` (time.monotonic) when given.
        `ready`: a poll just said the socket is readable, so a plain socket's read
        does not wait (and needs no timeout set: a system call saved)."""
        size = self._read_size
        try:
            if ready and not self.tls:
                try:
                    data = self.sock.recv(size, socket.MSG_DONTWAIT)
                except BlockingIOError:  # not readable after all: wait as usual
                    return self.read(request, deadline)
            elif request is None and not self.tls:
                data = self.sock.recv(size, socket.MSG_DONTWAIT)
            else:
                self._set_timeout(socket.SO_RCVTIMEO, 0.0 if request is None else
                                  timeout(request, "read") if deadline is None else
                                  time_left(deadline, time.monotonic()))
                data = self.sock.recv(size)
        except (TimeoutError, BlockingIOError, ssl.SSLWantReadError):
            # BlockingIOError: nothing there, or SO_RCVTIMEO expired
            if request is None:
                return
            raise httpx.ReadTimeout("timed out waiting for the upstream") from None
        except OSError as exc:  # a reset, or TLS cut without close_notify (SSLEOFError)
            self.codec.connection_broken(str(exc) or type(exc).__name__)
            return
        if data:
            # A full read means a big body is flowing: read more at a time.
            self._read_size = READ_SIZE if len(data) == size else SMALL_READ
        self.codec.receive_data(data)

    def write(self, data: bytes, request: Sendable) -> None:
        """Send all of `data`; an upstream that left is told to the codec, not raised."""
        self._set_timeout(socket.SO_SNDTIMEO, timeout(request, "write"))
        try:
            self.sock.sendall(data)
        except (TimeoutError, BlockingIOError):  # BlockingIOError: SO_SNDTIMEO expired
            raise httpx.WriteTimeout("upstream stopped reading the request") from None
        except OSError:
            self.codec.write_failed()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def connect_upstream(key: Key, seconds: float | None,
                     context: ssl.SSLContext | None = None,
                     ragged_eof: bool = True) -> socket.socket:
    """A blocking connection to `key` (pool.Key): TCP with Nagle off, or a unix socket;
    TLS-wrapped when `context` is given (SNI and the certificate name: the host).
    `ragged_eof=False`: a TLS cut without close_notify raises SSLEOFError instead
    of reading as EOF. httpx's ConnectTimeout/ConnectError on failure
    (UpstreamTLSError: not verified)."""
    scheme, host, port = key
    try:
        if scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(seconds)
                sock.connect(host)
            except BaseException:
                sock.close()
                raise
        else:
            sock = socket.create_connection((host, port), timeout=seconds)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if context is not None:
            try:  # the handshake runs within the connect timeout set above
                sock = context.wrap_socket(sock, server_hostname=host,
                                           suppress_ragged_eofs=ragged_eof)
            except BaseException:
                sock.close()
                raise
    except TimeoutError:
        raise httpx.ConnectTimeout(f"connecting to {address(key)} timed out") from None
    except OSError as exc:
        raise connect_failed(key, exc) from exc
    return sock


class ClientWatch:
    """Tells the sync transport, while it waits for the upstream's head, that the client left.

    `sock`: the client's socket (gunicorn puts it in the environ); its FIN or
    reset ends the wait, as nginx ends a request whose client closed. `gone`: an
    event a server bridge sets on disconnect (looked at every 50 ms while waiting).
    `stop_fd`: readable once the graceful timeout passed (drain.py): ShuttingDown.
    """

    __slots__ = ("sock", "gone", "stop_fd")

    def __init__(self, sock: socket.socket | None = None,
                 gone: threading.Event | None = None, stop_fd: int | None = None) -> None:
        self.sock = sock
        self.gone = gone
        self.stop_fd = stop_fd

    def wait(self, conn: _SyncConn, seconds: float | None) -> None:
        """Return once `conn` has bytes (or EOF) to read; raise if the client left first."""
        if conn.tls and cast(ssl.SSLSocket, conn.sock).pending():
            return
        poller = select.poll()
        try:
            upstream_fd = conn.sock.fileno()
            poller.register(upstream_fd, select.POLLIN)
            if self.sock is not None and self.sock.fileno() >= 0:
                poller.register(self.sock, _GONE_EVENTS)
            if self.stop_fd is not None:
                poller.register(self.stop_fd, select.POLLIN)
        except (OSError, ValueError):
            return  # a closed socket: let the read itself report it
        deadline = None if seconds is None else time.monotonic() + seconds
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
                if fd == self.stop_fd:
                    raise ShuttingDown()
                raise ClientDisconnected("the client went away before the response head")


class UpstreamTransport(Pool[_SyncConn], httpx.BaseTransport):
    """The sync transport dualproxy's SyncProxy uses by default (thread-safe)."""

    def _init_waiting(self) -> None:
        # A lock guards the counts and the idle pool (taken in C: no Python frames, as
        # a Condition's own `with` costs); the Condition on the same lock is for the
        # rare wait for a free slot, notified only when someone waits. Reentrant, as
        # the Condition's own default.
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._waiting = 0

    def _acquire(self, call: Sendable) -> None:
        with self._lock:
            if self._used < self._limit:
                self._used += 1
                return
            seconds = timeout(call, "pool")  # read only when a wait comes
            deadline = None if seconds is None else time.monotonic() + seconds
            self._waiting += 1
            try:
                while self._used >= self._limit:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise httpx.PoolTimeout("no upstream connection became free")
                    self._cond.wait(remaining)
            finally:
                self._waiting -= 1
            self._used += 1

    def _release(self) -> None:
        with self._lock:
            self._used -= 1
            if self._waiting:
                self._cond.notify()

    def _take_idle(self, key: Key) -> _SyncConn | None:
        with self._lock:
            return self._idle.take(key)

    def _connect(self, key: Key, request: Sendable, fresh: bool,
                 deadline: float | None) -> _SyncConn:
        while not fresh and (idle := self._take_idle(key)) is not None:
            if idle.usable():
                return idle
            idle.close()
        with self._lock:
            context = self._context(key)
        seconds = connect_timeout(request, deadline, time.monotonic())
        # A TLS cut must not pass for the clean end of a close-delimited body.
        sock = connect_upstream(key, seconds, context, ragged_eof=False)
        return _SyncConn(sock)

    def close(self) -> None:
        """Close the idle connections; those in use close when they come back."""
        with self._lock:
            conns = self._idle.drain()
        for conn in conns:
            conn.close()

    def _checkin(self, key: Key, conn: _SyncConn) -> None:
        with self._lock:
            kept = conn.codec.reusable and self._idle.put(key, conn)
            self._used -= 1
            if self._waiting:
                self._cond.notify()
        if not kept:
            conn.close()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        reply = self.send(Call.of(request))
        return to_httpx(reply.head, reply.stream, request)

    def send(self, call: Call) -> Reply:
        """Send `call`; its final response head and body stream (httpx's errors).
        The WSGI face calls it directly, without an httpx.Request and Response."""
        key = call.key
        self._acquire(call)
        try:
            conn, head = self._send(key, call)
        except BaseException:
            self._release()
            raise
        return Reply(head, self._body(key, conn, call, _SyncBody))

    def _send(self, key: Key, call: Call) -> tuple[_SyncConn, Response]:
        deadline = head_deadline(call, time.monotonic())
        for fresh in (False, True):
            conn = self._connect(key, call, fresh, deadline)
            try:
                return conn, self._exchange(conn, call, deadline)
            except RETRY_ON as exc:
                conn.close()
                if fresh or not conn.codec.may_retry():
                    tell_unsent(exc, conn)
                    raise
            except BaseException as exc:
                conn.close()
                tell_unsent(exc, conn)
                raise
        raise AssertionError("unreachable")

    def _exchange(self, conn: _SyncConn, call: Call, deadline: float | None) -> Response:
        codec = conn.codec
        conn.write(codec.send_request(call.method, call.target, call.headers), call)
        if codec.expects_body:
            self._upload(conn, call)
            deadline = head_deadline(call, time.monotonic())
        watch = call.extensions.get(CLIENT_WATCH)
        while True:
            event = codec.next_event()
            if isinstance(event, Response):
                if not event.interim:
                    return event
                continue
            if watch is not None:
                watch.wait(conn, time_left(deadline, time.monotonic()))
            conn.read(call, deadline, ready=watch is not None)

    @staticmethod
    def _upload(conn: _SyncConn, call: Call) -> None:
        codec = conn.codec
        stream = call.stream
        assert isinstance(stream, Iterable)
        for piece in stream:
            conn.read(None)  # an early answer stops the upload (the codec decides)
            data = codec.send_body(piece)
            if data:
                conn.write(data, call)
            elif codec.upload_stopped:
                return
        data = codec.end_body()
        if data:
            conn.write(data, call)


class _SyncBody(PooledBody[_SyncConn], httpx.SyncByteStream):
    def __iter__(self) -> Iterator[bytes]:
        conn = self._conn
        if conn is None:
            return
        codec = conn.codec
        request = self._request
        event = codec.next_event()
        while event.__class__ is not EndOfMessage:
            if event is NEED_DATA:
                conn.read(request)
            elif codec.done:
                self._finish()  # back to the pool before the last piece (see aio)
                yield cast(Data, event).data
                return
            else:
                yield cast(Data, event).data
            event = codec.next_event()
        self._finish()

    def close(self) -> None:
        self._abandon()
