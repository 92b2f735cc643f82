"""gunicorn's threaded worker as dualproxy runs it: heads gathered off-thread, problem answers.

- The drain: gunicorn's SIGTERM to a worker (a stop, a HUP reload, a
  scale-down) only ends its accept loop; the threads serving requests go on
  until the arbiter's graceful timeout kills the process, unlogged. With the
  clock started here, the proxy itself ends what is left at
  `--graceful-timeout` (drain.py), logs it, and the worker exits before the kill.
- The head: the stock worker hands a connection to a thread at its first byte,
  and the thread then blocks until the head is complete, so clients trickling
  partial heads (slowloris) hold every thread. Here the main loop gathers the
  head with non-blocking reads and hands the connection over only once it is
  whole; a head past HEAD_LIMIT is answered 414/431 unread, one not complete
  within `--header-timeout` is closed (408 if it had begun) (servers/limits.py).
  With TLS the handshake is done there too. That leans on the worker's private
  loop, so only on the gunicorn releases the suite tests.
- A graceful close (after an error answer, or `Connection: close`) lingers on
  the poller, where gunicorn 27 blocked its main loop for up to 2 s each.
- gunicorn's own answers to requests it cannot parse are HTML pages: here they
  are problem+json, like every other answer of the proxy.
"""

from __future__ import annotations

import selectors
import socket
import ssl
import time
from dataclasses import dataclass, field
from functools import partial
from types import FrameType
from typing import Any

from gunicorn import http
from gunicorn import sock as gunicorn_sock
from gunicorn.http2 import negotiation
from gunicorn.workers.gthread import ThreadWorker as _StockWorker

from ..drain import DRAIN
from ..errors import ProxyError
from . import gunicorn_body, is_tested
from .limits import HEAD_LIMIT, LINGER, HeadTimeout, head_too_large, header_timeout, raw_problem

READ_SIZE = 65536
HEAD_END = b"\r\n\r\n"


@dataclass
class _Head:
    """A connection's head so far, and when it must be complete."""

    deadline: float
    data: bytearray = field(default_factory=bytearray)
    secured: bool = False  # its TLS handshake is done (or there is none)

    def end(self) -> int:
        """The head's length once it is complete, else -1."""
        at = self.data.find(HEAD_END)
        return at + len(HEAD_END) if at >= 0 else -1


class _ErrorPage:
    """Stands in for the client socket while gunicorn writes its HTML error page,
    so that its status (gunicorn's choice of 400/403/414/417/431/501) is known."""

    def __init__(self) -> None:
        self.written = b""

    def gettimeout(self) -> float:
        return 0.0

    def sendall(self, data: bytes) -> None:
        self.written += data

    def status(self) -> int | None:
        parts = self.written.split(b" ", 2)
        return int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else None


def _body_done(parser: Any) -> bool:
    """Has the request on `parser` no body bytes left (gunicorn's Content-Length
    reader at 0, nothing buffered, nothing failed)? False when unsure."""
    body: Any = getattr(getattr(parser, "mesg", None), "body", None)
    reader: Any = getattr(body, "reader", None)
    return (type(reader) is http.body.LengthReader and reader.length == 0
            and body.failed is False and not body.buf.getvalue())


# The WSGI face reads request bodies through the registry (body_input.py): this
# worker's processes get gunicorn's direct reader.
_ = gunicorn_body.GunicornSource


class ThreadWorker(_StockWorker):  # type: ignore[misc]
    # Set per process: the private loop this leans on is the tested release's.
    gathers_heads = is_tested("gunicorn")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tls: ssl.SSLContext | None = None  # made once, not per connection
        self.heads: dict[Any, _Head] = {}  # connection -> its head so far
        # closing connection -> (when to close it at the latest, still in nr_conns)
        self.lingering: dict[Any, tuple[float, bool]] = {}

    # The stock loop tells the arbiter it lives (a utime of its heartbeat file) and
    # asks for its parent (getppid) at every turn, which under load is every
    # request or two: twice a second is plenty (the arbiter's limit is `timeout`).
    _CHECK_EVERY = 0.5
    _notified = _parent_checked = float("-inf")

    def notify(self) -> None:
        now = time.monotonic()
        if now - self._notified >= self._CHECK_EVERY:
            self._notified = now
            super().notify()

    def is_parent_alive(self) -> bool:
        now = time.monotonic()
        if now - self._parent_checked < self._CHECK_EVERY:
            return True
        self._parent_checked = now
        return bool(super().is_parent_alive())

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        DRAIN.begin()
        super().handle_exit(sig, frame)

    def handle_quit(self, sig: int, frame: FrameType | None) -> None:
        """gunicorn's quick stop (a second SIGINT): end what is left now, logged."""
        DRAIN.end_now()
        super().handle_quit(sig, frame)

    # --- the head, gathered by the main loop ---

    def enqueue_req(self, conn: Any) -> None:
        """Every way a connection reaches a thread (accepted, kept alive and readable,
        bytes read ahead) comes here: gather its head first where this worker can."""
        if (not self.gathers_heads or conn.is_http2
                or negotiation.prior_knowledge_allowed(self.cfg, conn.client)
                or getattr(conn, "head_whole", False)):
            conn.head_whole = False
            super().enqueue_req(conn)
            return
        conn.close = partial(self._close_conn, conn)
        if self.cfg.is_ssl and not isinstance(conn.sock, ssl.SSLSocket):
            # The handshake too happens here, within the head's time (TConn.init
            # wraps only a connection without a parser, which this one gets).
            if self._tls is None:
                self._tls = gunicorn_sock.ssl_context(self.cfg)
            conn.sock = self._tls.wrap_socket(
                conn.sock, server_side=True, do_handshake_on_connect=False,
                suppress_ragged_eofs=self.cfg.suppress_ragged_eofs)
        # A connection with a parser has served a request: its handshake is done.
        head = _Head(time.monotonic() + header_timeout(), secured=conn.parser is not None)
        if conn.parser is not None:  # read ahead by the last request's body drain
            head.data += conn.parser.unreader.take_buffered()
        if not self._head_progress(conn, head):
            if conn.sock.gettimeout() != 0.0:  # a kept-alive one is non-blocking already
                conn.sock.setblocking(False)
            # Most often the head is there already (a kept-alive connection comes here
            # once readable): read it now rather than after another turn of the poller.
            self._read_head(conn, head)

    def _gather(self, conn: Any, head: _Head) -> None:
        self.heads[conn] = head
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_head_bytes, conn))

    def _on_head_bytes(self, conn: Any, _sock: Any) -> None:
        self._read_head(conn, self._stop_gathering(conn))

    def _read_head(self, conn: Any, head: _Head) -> None:
        """Read what the non-blocking socket has of the head: hand the connection on
        once it is whole, else wait on the poller for more."""
        data: bytes | None = None
        try:
            if isinstance(conn.sock, ssl.SSLSocket) and not head.secured:
                conn.sock.do_handshake()
                head.secured = True
                if gunicorn_sock.is_http2_negotiated(conn.sock):
                    raise ssl.SSLError("h2 negotiated")  # dualproxy offers none
            # Never more than one byte past HEAD_LIMIT held per connection.
            data = conn.sock.recv(min(READ_SIZE, HEAD_LIMIT + 1 - len(head.data)))
            # TLS: what is left of a record already read never wakes the poller.
            while data and isinstance(conn.sock, ssl.SSLSocket) and conn.sock.pending() \
                    and len(head.data) + len(data) <= HEAD_LIMIT:
                data += conn.sock.recv(HEAD_LIMIT + 1 - len(head.data) - len(data))
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError,
                ssl.SSLWantWriteError):
            pass
        except OSError:  # a reset, a failed handshake
            data = b""
        if data == b"":  # the client left
            self._close(conn)
            return
        head.data += data or b""
        if not self._head_progress(conn, head):
            self._gather(conn, head)

    def _head_progress(self, conn: Any, head: _Head) -> bool:
        """Hand the connection to a thread or refuse it once its head says so;
        False while the head is still coming."""
        end = head.end()
        refusal = head_too_large(end if end >= 0 else len(head.data),
                                 head.data.find(b"\r\n", 2) >= 0)
        if refusal is not None:
            self._refuse(conn, refusal)
            return True
        if end < 0:
            return False
        if conn.parser is None:
            conn.parser = http.get_parser(self.cfg, conn.sock, conn.client)
        conn.parser.unreader.unread(bytes(head.data))
        conn.data_ready = True  # the stock handler would wait for a first byte
        conn.head_whole = True
        self.enqueue_req(conn)
        return True

    def _stop_gathering(self, conn: Any) -> _Head:
        self.poller.unregister(conn.sock)
        return self.heads.pop(conn)

    def _refuse(self, conn: Any, exc: ProxyError) -> None:
        """Answer `exc` and close after draining what the client still sends."""
        self.log.warning("Invalid request from ip=%s: %s", conn.client[0] if conn.client
                         else "", exc.detail)
        try:
            conn.sock.setblocking(False)
            conn.sock.send(raw_problem(exc))  # small: fits an empty send buffer
        except OSError:
            self._close(conn)
            return
        self._linger(conn, counted=True)

    def _close_conn(self, conn: Any, graceful: bool = False) -> None:
        """TConn.close for the connections this worker gathers heads for. The stock
        graceful close (after an error answer or `Connection: close`) drains the
        client for up to 2 s blocking the main loop: a client keeping a refused
        connection open froze the whole worker. Here the poller drains it."""
        if graceful:
            self._linger(conn, counted=False)  # the stock caller took it off nr_conns
        else:
            type(conn).close(conn)

    def _linger(self, conn: Any, *, counted: bool) -> None:
        """Close after LINGER, or once the client closes, reading and dropping what it
        still sends: closing with unread bytes resets the connection, and the
        client may lose the answer (nginx's lingering close)."""
        try:
            conn.sock.setblocking(False)
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            type(conn).close(conn)
            if counted:
                self.nr_conns -= 1
            return
        self.lingering[conn] = (time.monotonic() + LINGER, counted)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_linger, conn))

    def _on_linger(self, conn: Any, _sock: Any) -> None:
        try:
            if conn.sock.recv(READ_SIZE):
                return
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
            return
        except OSError:
            pass
        self._end_linger(conn)

    def _end_linger(self, conn: Any) -> None:
        _, counted = self.lingering.pop(conn)
        self.poller.unregister(conn.sock)
        type(conn).close(conn)
        if counted:
            self.nr_conns -= 1

    def _close(self, conn: Any) -> None:
        self.nr_conns -= 1
        type(conn).close(conn)

    def murder_pending(self) -> None:
        """The stock loop's timer step (about once a second): also ends heads past
        their deadline and lingering closes past theirs."""
        super().murder_pending()
        now = time.monotonic()
        for conn, head in [(c, h) for c, h in self.heads.items() if h.deadline <= now]:
            self._stop_gathering(conn)
            if head.data.strip():
                self._refuse(conn, HeadTimeout())
            else:  # nothing sent: closed quietly, as nginx does
                self._close(conn)
        for conn in [c for c, (deadline, _) in self.lingering.items() if deadline <= now]:
            self._end_linger(conn)

    def _cap_keepalive(self, deadline: float) -> None:
        """A stopping worker gives heads still coming as long as kept-alive connections."""
        super()._cap_keepalive(deadline)
        for head in self.heads.values():
            head.deadline = min(head.deadline, deadline)

    def _keepalive_after(self, conn: Any, keepalive: bool) -> bool:
        """The stock check drains what is left of the request body within a time
        bound, setting the socket's timeout and back (two system calls) even when
        nothing is left: a bodiless request, or a body read to its end."""
        if keepalive and self.gathers_heads and _body_done(conn.parser):
            return True
        return bool(super()._keepalive_after(conn, keepalive))

    # --- gunicorn's own error answers ---

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        """gunicorn's answer to a request it could not parse (or an app crash), with
        its status and log line, as problem+json instead of an HTML page."""
        page = _ErrorPage()
        super().handle_error(req, page, addr, exc)
        status = page.status()
        answer = page.written  # a page of an unexpected shape: gunicorn's own
        if status is not None and 400 <= status <= 599:
            detail = str(exc) if status < 500 else "the server could not answer this request"
            answer = raw_problem(ProxyError(detail[:200], status=status))
        try:
            client.settimeout(LINGER)
            client.sendall(answer)
        except OSError:
            pass
