"""The WSGI face's WebSocket: a byte tunnel on the client socket, as nginx does.

WSGI has no WebSocket, but gunicorn's threaded worker (`gunicorn.socket`) and
werkzeug's dev server (`werkzeug.socket`) hand the app the client socket. The
handshake goes upstream over a fresh TCP connection (the plan from
`handshake`, the client's key, version, protocols and extensions passed whole,
so both ends agree on one handshake). The upstream's refusal travels back as an
ordinary WSGI response; its 101 is written to the client socket by hand, then
raw bytes flow both ways until one side closes. Any other WSGI server has no
socket to take over: 501.

One thread per open socket: the tunnel runs while the server iterates the
response (`Tunnel`), so it holds one of the worker's `--threads` until it ends;
`TUNNELS` caps how many a process holds (`--ws-max-tunnels`), so idle sockets
cannot take every thread from plain HTTP. When it ends, it raises
`TunnelClosed`, which both servers take as "the client connection is gone":
they write no response and close the socket.
"""

from __future__ import annotations

import errno
import io
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn, Protocol

import httpx

from ..config import ProxyConfig
from ..core import IncomingRequest, ResponseHead, UpstreamPlan, plan_response
from ..drain import DRAIN
from ..errors import (
    InvalidHead,
    ProxyError,
    ServiceUnavailable,
    map_stream_errors,
    map_upstream_errors,
)
from ..http1 import ClientConnection, Data, EndOfMessage, Response, connect_upstream
from ..http1.connect import upstream_key
from ..http1.tls import upstream_context
from ..logs import RequestRecord
from ..types import Environ, StartResponse
from ..upstreams import Upstream
from ..wire import head_problem
from .handshake import (
    BadUpgrade,
    WebSocketPlan,
    accept_head,
    check_accept,
    plan_handshake,
    upgrade_plan,
)
from .splice import READ_SIZE, relay

# The servers that hand a WSGI app its client socket.
SOCKET_KEYS = ("gunicorn.socket", "werkzeug.socket")
HEAD_TIMEOUT = 5.0  # for writing the 101 head to the client


class Finisher(Protocol):
    """What opens a session and ends a request's record: the face (or its access log)."""

    def session_opened(self, record: RequestRecord) -> None: ...

    def finish(self, record: RequestRecord) -> None: ...


class NoSocketTakeover(ProxyError):
    """This WSGI server gives the app no client socket to tunnel a WebSocket on."""

    status = 501


class TunnelClosed(ConnectionError):
    """The tunnel ended; the client connection is no longer HTTP.

    Raised out of the response iterable: werkzeug treats a ConnectionError as a
    dropped client, and gunicorn an ENOTCONN as a quiet close. Neither writes a
    response nor reuses the socket.
    """

    def __init__(self) -> None:
        super().__init__(errno.ENOTCONN, "WebSocket tunnel closed")


class TunnelsFull(ServiceUnavailable):
    """Every tunnel this worker may hold is open: try again shortly."""

    RETRY_AFTER = 5

    def __init__(self, limit: int) -> None:
        super().__init__(f"this worker already holds its {limit} WebSocket tunnels")

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [*super().headers(), (b"retry-after", str(self.RETRY_AFTER).encode())]


class TunnelSlots:
    """How many tunnels this process holds, against its cap (None: no cap)."""

    def __init__(self) -> None:
        self.limit: int | None = None
        self.open = 0
        self._lock = threading.Lock()

    def take(self) -> _Slot:
        """One slot for a handshake (TunnelsFull when none is left): released by its
        `done` unless `keep` gave it to the Tunnel, which releases it."""
        with self._lock:
            if self.limit is not None and self.open >= self.limit:
                raise TunnelsFull(self.limit)
            self.open += 1
        return _Slot(self)

    @contextmanager
    def slot(self) -> Iterator[_Slot]:
        """`take` for a block: the slot is done at its end."""
        held = self.take()
        try:
            yield held
        finally:
            held.done()

    def release(self) -> None:
        with self._lock:
            self.open -= 1


class _Slot:
    def __init__(self, slots: TunnelSlots) -> None:
        self.slots, self.kept = slots, False

    def done(self) -> None:
        if not self.kept:
            self.kept = True
            self.slots.release()

    def keep(self, answer: Iterable[bytes]) -> Iterable[bytes]:
        """The handshake's answer; a Tunnel keeps the slot until it closes."""
        if isinstance(answer, Tunnel):
            answer.slots, self.kept = self.slots, True
        return answer


TUNNELS = TunnelSlots()


def default_max_tunnels(threads: int) -> int:
    """A quarter of the threads (at least one) stay for plain HTTP."""
    return threads - max(1, threads // 4)


def client_socket(environ: Environ) -> socket.socket | None:
    """The client socket the server lets the app take over, if any.

    Not under gunicorn's sync worker (`wsgi.multithread` false): its timeout
    watchdog would kill the worker in the middle of any socket open longer.
    """
    for key in SOCKET_KEYS:
        sock = environ.get(key)
        if isinstance(sock, socket.socket):
            return sock if key != "gunicorn.socket" or environ.get("wsgi.multithread") else None
    return None


class TunnelSteps:
    """The WSGI face's WebSocket handshake steps (exchange.HandshakePort, with the
    face's fallback, problem and answer): a client socket to take over and a
    tunnel slot (`ready`), the handshake upstream (`attempt`), the head of its
    answer (`head`), then a `Tunnel` on a 101, or its refusal relayed (`opened`).
    Every refusal is raised as a ProxyError (501 without a client socket, 502/504
    for the upstream) before anything is sent to the client."""

    proxy: Any  # the face: its config, `finish` and `session_opened`
    environ: Environ
    start_response: StartResponse
    record: RequestRecord
    _ws: WebSocketPlan | None = None
    _plan: UpstreamPlan | None = None
    _client: socket.socket | None = None
    _slot: _Slot | None = None

    def plan(self, incoming: IncomingRequest) -> UpstreamPlan:
        return plan_handshake(self.proxy.config, incoming, routes=self.proxy.routes)

    def ready(self, plan: UpstreamPlan) -> bool:
        client = client_socket(self.environ)
        if client is None:
            raise NoSocketTakeover(
                "this WSGI server cannot hand over the client connection, so it cannot carry "
                "a WebSocket; run the WSGI face under gunicorn's gthread worker, werkzeug's "
                "server or uvicorn")
        self._slot = TUNNELS.take()
        self._client, self._plan = client, plan
        return True

    def attempt(self, upstream: Upstream) -> tuple[socket.socket, ClientConnection, Response]:
        assert self._plan is not None
        config = self.proxy.config
        self._ws = ws = upgrade_plan(config, self._plan, tunnel=True, upstream=upstream)
        with map_upstream_errors():
            return open_upstream(ws, config, upstream)

    def head(self, result: tuple[socket.socket, ClientConnection, Response]) -> ResponseHead:
        sock, _conn, answer = result
        config, ws = self.proxy.config, self._ws
        assert ws is not None and self._plan is not None and self._client is not None
        self.record.upstream_status(answer.status)
        headers = [(name.lower(), value) for name, value in answer.headers]
        if answer.status != 101:
            return plan_response(config, self._plan, answer.status, headers)
        try:
            check_accept(ws.headers, headers)  # before a byte is spliced
        except BadUpgrade:
            _stop_reading(self._client, self.environ)
            raise
        accept = accept_head(config, ws, answer.status, headers)
        problem = head_problem(None, accept.headers)
        if problem is not None:  # the 101 is written to the client socket by hand
            raise InvalidHead(problem) from problem
        return accept

    def drop(self, result: tuple[socket.socket, ClientConnection, Response]) -> None:
        result[0].close()

    def opened(self, result: tuple[socket.socket, ClientConnection, Response],
               head: ResponseHead) -> Iterable[bytes]:
        sock, conn, _answer = result
        config, record = self.proxy.config, self.record
        assert self._client is not None and self._slot is not None
        if head.status == 101:
            try:
                tunnel = Tunnel(self._client, sock, head, record, self.proxy)
                tunnel.limits(config.ws_idle_timeout, config.ws_max_size)
                tunnel.early(conn.take_trailing(), _server_buffered(self.environ))
            except BaseException:
                sock.close()
                raise
            return self._slot.keep(tunnel)
        self.start_response(head.status_line, _str_headers(head.headers))
        record.status = head.status
        return Refusal(sock, conn, head.has_body, config.idle_timeout, record, self.proxy)

    def close(self) -> None:
        """The handshake is answered: its slot goes back unless a Tunnel keeps it."""
        slot, self._slot = self._slot, None
        if slot is not None:
            slot.done()


def open_upstream(ws: WebSocketPlan, config: ProxyConfig, upstream: Upstream
                  ) -> tuple[socket.socket, ClientConnection, Response]:
    """Connect to `upstream` (TLS as the config says for https, AF_UNIX for a
    socket), send the handshake, read the answer head, all within `config.timeout`.

    Raises httpx errors (map_upstream_errors turns them into 502/504). Returns
    the socket, its connection state (holding what the upstream sent after the
    head) and the final head.
    """
    timeout = config.timeout
    deadline = time.monotonic() + timeout
    sock = connect_upstream(upstream_key(upstream), timeout, upstream_context(config, upstream))
    conn = ClientConnection()
    try:
        sock.sendall(conn.send_request(b"GET", ws.target, ws.headers))
        while True:
            event = conn.next_event()
            if isinstance(event, Response):
                if not event.interim:
                    return sock, conn, event
                continue
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            data = sock.recv(READ_SIZE)
            if not data:
                raise httpx.RemoteProtocolError("the upstream closed before answering")
            conn.receive_data(data)
    except TimeoutError:
        sock.close()
        raise httpx.ReadTimeout("the upstream did not answer the handshake in time") from None
    except BaseException:
        sock.close()
        raise


def _stop_reading(client: socket.socket, environ: Environ) -> None:
    """Close the client connection after the answer: drop what the server read past
    the handshake, and end the socket's read side (the server then sees the end of
    the connection where it would look for another request)."""
    _server_buffered(environ)
    try:
        client.shutdown(socket.SHUT_RD)
    except OSError:
        pass


def _str_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in headers]


def _server_buffered(environ: Environ) -> bytes:
    """Bytes the server read past the handshake head (a client that did not wait for the 101).

    gunicorn keeps them in its parser's unreader; werkzeug in its buffered rfile.
    """
    stream = environ.get("wsgi.input")
    unreader: Any = getattr(getattr(stream, "reader", None), "unreader", None)
    if isinstance(getattr(unreader, "buf", None), io.BytesIO):
        data: bytes = unreader.buf.getvalue()
        unreader.buf = io.BytesIO()
        return data
    sock = getattr(getattr(stream, "raw", None), "_sock", None)
    if not isinstance(stream, io.BufferedReader) or not isinstance(sock, socket.socket):
        return b""
    # peek() reads the socket only when the buffer is empty: never block there.
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        size = len(stream.peek(READ_SIZE))
    except OSError:
        size = 0
    finally:
        sock.settimeout(timeout)
    return stream.read(size) if size else b""


class Refusal:
    """The WSGI body of an upstream's non-101 answer, decoded as framed, then closed."""

    def __init__(self, sock: socket.socket, conn: ClientConnection, has_body: bool,
                 idle: float, record: RequestRecord, log: Finisher) -> None:
        self.sock, self.conn, self.has_body = sock, conn, has_body
        self.idle, self.record, self.log = idle, record, log

    def __iter__(self) -> Iterator[bytes]:
        conn = self.conn
        with map_stream_errors():
            while self.has_body:
                event = conn.next_event()
                if isinstance(event, Data):
                    self.record.bytes_out += len(event.data)
                    yield event.data
                elif isinstance(event, EndOfMessage):
                    break
                else:
                    self.sock.settimeout(self.idle)
                    conn.receive_data(self.sock.recv(READ_SIZE))
        self.record.responded = True

    def close(self) -> None:
        self.sock.close()
        self.log.finish(self.record)


class Tunnel:
    """The response iterable of an accepted handshake: write the 101, relay, raise.

    Never yields: iterating it runs the tunnel on the client socket and ends
    with TunnelClosed. A server that closes it unrun only closes the upstream.
    """

    def __init__(self, client: socket.socket, upstream: socket.socket, accept: ResponseHead,
                 record: RequestRecord, log: Finisher) -> None:
        self.client, self.upstream, self.accept = client, upstream, accept
        self.record, self.log = record, log
        self.idle: float | None = None
        self.max_size: int | None = None
        self.upstream_early = self.client_early = b""
        self.slots: TunnelSlots | None = None  # released at close
        self._done = False

    def limits(self, idle: float | None, max_size: int | None) -> None:
        """Silence allowed (then 1001) and the largest message (then 1009), wire sizes."""
        self.idle, self.max_size = idle, max_size

    def early(self, from_upstream: bytes, from_client: bytes) -> None:
        """Bytes either side sent right behind its handshake head: relayed first."""
        self.upstream_early, self.client_early = from_upstream, from_client

    def __iter__(self) -> Iterator[bytes]:
        self.run()

    def run(self) -> NoReturn:
        record = self.record
        record.status = 101
        try:
            head = [b"HTTP/1.1 101 Switching Protocols\r\n"]
            head += [name + b": " + value + b"\r\n" for name, value in self.accept.headers]
            head.append(b"\r\n")
            self.client.settimeout(HEAD_TIMEOUT)
            self.client.sendall(b"".join(head))
            record.responded = True
            self.log.session_opened(record)
            result = relay(self.client, self.upstream, to_client=self.upstream_early,
                           to_upstream=self.client_early, idle=self.idle,
                           max_size=self.max_size,
                           stop_fd=DRAIN.wake_fd() if DRAIN.armed else None)
            record.bytes_in, record.bytes_out = result.to_upstream, result.to_client
            record.shutdown = result.stopped
            # A peer that vanished is a WebSocket's ordinary end, not a proxy failure.
            record.client_gone = result.failure is not None
        except OSError:  # writing the 101: the client is gone already
            record.client_gone = True
        finally:
            self.close()
        raise TunnelClosed()

    def close(self) -> None:
        if self._done:
            return
        self._done = True
        if self.slots is not None:
            self.slots.release()
        self.upstream.close()
        try:
            # Shut, not closed: the server still owns the socket and closes it.
            self.client.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.log.finish(self.record)
