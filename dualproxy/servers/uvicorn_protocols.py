"""uvicorn's protocols with the stop handed to dualproxy's drain clock (drain.py),
and the request head bounded in size and time (servers/limits.py).

uvicorn starts a graceful stop by calling `shutdown()` on every connection:
that is where the clock starts, in every uvicorn-run process (one server,
`--workers N`, gunicorn's uvicorn worker). Its WebSocket protocol would close
an open socket right there with 1012; dualproxy's contract keeps it open until
the graceful timeout and then closes it 1001 (the ASGI face's session does),
like any other exchange still in flight. Loaded by import string from
`uvicorn_protocol_settings`, only on the uvicorn releases the suite tests.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from types import FrameType
from typing import Any

from uvicorn.protocols.http import httptools_impl
from uvicorn.protocols.http.auto import AutoHTTPProtocol
from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    STATUS_LINE,
    RequestResponseCycle,
)
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from ..drain import DRAIN
from ..errors import BadRequest, ProxyError
from ..headers import _VALID_NAMES, _valid_name
from ..waits import LazyTimer
from . import BODY_FOLLOWS, ON_GONE
from .limits import LINGER, HeadTimeout, head_too_large, header_timeout, raw_problem


def start_clock() -> None:
    """Start the drain clock; the next SIGINT (uvicorn's force quit) ends what is left
    first, so it is logged, not cancelled. uvicorn puts its own handler back after."""
    if DRAIN.deadline is None and threading.current_thread() is threading.main_thread():
        forced: Any = signal.getsignal(signal.SIGINT)
        if callable(forced):
            def force(signum: int, frame: FrameType | None) -> None:
                DRAIN.end_now()
                forced(signum, frame)

            signal.signal(signal.SIGINT, force)
    DRAIN.begin()


# How long an idle keep-alive connection stays open once the stop began.
IDLE_GRACE = 1.0
# uvicorn's protocol is httptools' (not h11's): the request head is bounded.
_HTTPTOOLS = hasattr(AutoHTTPProtocol, "on_headers_complete")


class CorkedTransport:
    """The transport one response cycle writes through: its first write (the head) is
    held until the next write (the body's first piece, or its end) and the two go out
    in one send, or until the loop's next turn when no body follows at once (an SSE
    stream's head is not kept waiting); `hold` skips that callback when the app said
    the body comes next (BODY_FOLLOWS). A small answer is one send instead of two: a
    write is a system call and a TCP segment, the most a small GET costs the proxy.
    Anything else (close, is_closing, ...) is the real transport's, after the held
    head went out."""

    __slots__ = ("transport", "loop", "held")

    def __init__(self, transport: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.transport, self.loop = transport, loop
        self.held: bytes | None = b""  # b"": the first write is still to come

    def write(self, data: bytes) -> None:
        held = self.held
        if held is None:
            self.transport.write(data)
        elif not held:
            self.held = data
            self.loop.call_soon(self.flush)
        else:
            self.held = None
            if len(data) <= 16384:  # copying is cheaper than a second buffer
                self.transport.write(held + data)
            else:
                self.transport.writelines((held, data))

    def hold(self, data: bytes) -> None:
        """Write `data`, the head, held for the next write with no callback: the app
        said the body's first message comes next, without a wait (BODY_FOLLOWS)."""
        if self.held == b"":
            self.held = data
        else:
            self.write(data)

    def flush(self) -> None:
        held, self.held = self.held, None
        if held and not self.transport.is_closing():
            self.transport.write(held)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def __getattr__(self, name: str) -> Any:
        self.flush()
        return getattr(self.transport, name)


# The fields whose values uvicorn's send reads (the body's framing, keep-alive).
_READ_FIELDS = frozenset((b"content-length", b"transfer-encoding", b"connection"))
# The bytes a value may hold: all but HEADER_VALUE_RE's class (checked in the tests).
_VALUE_BYTES = bytes([9, *range(0x20, 0x7f), *range(0x80, 0x100)])


class Cycle(RequestResponseCycle):
    """uvicorn's (httptools) response cycle, its `send` cheaper for the head: the
    same checks (HEADER_RE on each name, HEADER_VALUE_RE on each value), the same
    head and the same errors, in one pass over the fields; a name that is a token
    (which HEADER_RE takes) is looked up in the memo of those checked before
    (headers.py's), not matched, and the values are checked once, joined (the
    rule is a class of single bytes: a joined value holds a bad byte when one
    value does). A head they refuse goes through uvicorn's own `send`, which
    raises as it always did."""

    async def send(self, message: Any) -> None:
        if self.flow.write_paused or self.disconnected:
            transport: Any = self.transport
            if transport.__class__ is CorkedTransport:
                transport.flush()  # a held head first: uvicorn's send may write none
            await RequestResponseCycle.send(self, message)
            return
        if self.response_started:
            if self.response_complete or message["type"] != "http.response.body":
                await RequestResponseCycle.send(self, message)
            else:
                self._body(message)
            return
        if message["type"] != "http.response.start":
            await RequestResponseCycle.send(self, message)
            return
        content = None if self.access_log else self._head(
            message["status"], self.default_headers + list(message.get("headers", [])))
        if content is None:
            # A head uvicorn refuses (its send says how), or an access line to log
            # (uvicorn's own: dualproxy serve turns it off).
            await RequestResponseCycle.send(self, message)
            return
        head = b"".join(content)
        out: Any = self.transport
        if message.get(BODY_FOLLOWS) and out.__class__ is CorkedTransport:
            out.hold(head)
        else:
            out.write(head)

    def _head(self, status_code: int, headers: list[tuple[bytes, bytes]]) -> list[bytes] | None:
        """The head's pieces, as uvicorn writes them, the response started; None
        when uvicorn's send would refuse a field (nothing changed then)."""
        names = _VALID_NAMES
        read = []
        try:
            content = [STATUS_LINE[status_code]]
            for name, value in headers:
                if name not in names and not _valid_name(name) and HEADER_RE.search(name):
                    return None
                name = name.lower()
                if name in _READ_FIELDS:
                    read.append((name, value))
                content += name, b": ", value, b"\r\n"
            # HEADER_VALUE_RE on the values: a byte of its class left once the others
            # are deleted (a table look-up a byte; the regex's search cost 4x that).
            if b"".join(content[3::4]).translate(None, _VALUE_BYTES):
                return None
        except Exception:  # not bytes, no such status: uvicorn's send raises its error
            return None
        self.response_started = True
        self.waiting_for_100_continue = False
        has_connection_close = False
        for name, value in read:  # uvicorn's steps, on the fields it reads
            if name == b"content-length" and self.chunked_encoding is None:
                self.expected_content_length = int(value.decode())
                self.chunked_encoding = False
            elif name == b"transfer-encoding" and value.lower() == b"chunked":
                self.expected_content_length = 0
                self.chunked_encoding = True
            elif name == b"connection":
                connection = [token.lower().strip() for token in value.split(b",")]
                if b"close" in connection:
                    self.keep_alive = False
                    has_connection_close = True
        if not self.keep_alive and not has_connection_close:
            content.append(b"connection: close\r\n")
        if (self.chunked_encoding is None and self.scope["method"] != "HEAD"
                and status_code not in (204, 304)):
            # Neither content-length nor transfer-encoding specified
            self.chunked_encoding = True
            content.append(b"transfer-encoding: chunked\r\n")
        content.append(b"\r\n")
        return content

    def _body(self, message: Any) -> None:
        """uvicorn's send for a body message (the response started, not complete)."""
        body = message.get("body", b"")
        more_body = message.get("more_body", False)
        if self.scope["method"] == "HEAD":
            self.expected_content_length = 0
            self.transport.write(b"")  # (a held head goes out: no body to go with it)
        elif self.chunked_encoding:
            if body:
                content = [b"%x\r\n" % len(body), body, b"\r\n"]
            else:
                content = []
            if not more_body:
                content.append(b"0\r\n\r\n")
            self.transport.write(b"".join(content))
        else:
            num_bytes = len(body)
            if num_bytes > self.expected_content_length:
                raise RuntimeError("Response content longer than Content-Length")
            self.expected_content_length -= num_bytes
            self.transport.write(body)
        if not more_body:
            if self.expected_content_length != 0:
                raise RuntimeError("Response content shorter than Content-Length")
            self.response_complete = True
            self.message_event.set()
            if not self.keep_alive:
                self.transport.close()
            self.on_response()


class HTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc,valid-type]
    """uvicorn's HTTP protocol (httptools), with the stop starting the drain clock
    and the request head bounded.

    uvicorn closes an idle keep-alive connection the moment a stop begins; a
    client sending its next request right then gets a reset (seen across a
    `--workers` HUP restart). As gunicorn 27 does, the connection stays open
    IDLE_GRACE seconds instead: a request that comes is answered with
    `Connection: close`, a connection that stays quiet is closed.

    httptools sets no limit on a head (its url and a header being received grow
    without bound) and uvicorn no time limit before the first request: here the
    bytes of a head are counted as they arrive (past HEAD_LIMIT: 414/431), and a
    head gets `header_timeout()` seconds from the connection or its first byte
    (then closed, 408 if it had begun). uvicorn's own 400 is problem+json too.
    h11's protocol (no httptools) has `h11_max_incomplete_event_size` instead.
    """

    draining = False
    refused = False
    in_message = False
    in_head = False
    line_done = False  # the head being received is past its request line
    head_bytes = 0
    body_bytes = 0
    # Two lazy clocks (waits.LazyTimer), so a request arms and cancels no timer: the
    # head clock (its deadline: when the head being received times out) and the idle
    # clock, uvicorn's keep-alive timeout (uvicorn arms a timer as each response ends
    # and cancels it at the next bytes; here its deadline is set and cleared there).
    head_clock: LazyTimer
    idle_clock: LazyTimer
    cycles: list[Any]  # the connection's cycles, the unfinished ones at least

    def connection_made(self, transport: Any) -> None:
        self.head_clock = LazyTimer(self.loop, self.head_timed_out)
        self.idle_clock = LazyTimer(self.loop, self.timeout_keep_alive_handler)
        self.cycles = []
        super().connection_made(transport)
        if _HTTPTOOLS:
            self.start_head_clock()

    def flush(self) -> None:
        """The held heads out, before the protocol writes or closes by itself."""
        for cycle in self.cycles:
            if isinstance(cycle.transport, CorkedTransport):
                cycle.transport.flush()

    def shutdown(self) -> None:
        start_clock()
        self.flush()
        idle = self.cycle is None or self.cycle.response_complete
        if not idle or not _HTTPTOOLS:  # busy, or h11's protocol
            super().shutdown()
            return
        self.draining = True
        self.idle_clock.set(self.loop.time() + IDLE_GRACE)  # (the keep-alive's, replaced)

    def _unset_keepalive_if_required(self) -> None:
        """uvicorn's keep-alive timeout stopped (bytes came, the connection closed)."""
        self.idle_clock.deadline = None

    def on_response_complete(self) -> None:
        # uvicorn's steps (httptools, 0.54), the keep-alive timeout on the idle clock.
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.idle_clock.deadline = None
        self.flow.resume_reading()
        if self.pipeline:  # the next pipelined request's turn
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        else:
            self.idle_clock.set(self.loop.time() + self.timeout_keep_alive)

    def data_received(self, data: bytes) -> None:
        if self.refused:  # answered: what still comes is drained unread
            return
        if not _HTTPTOOLS:
            super().data_received(data)
            return
        if self.head_clock.deadline is None and not self.in_message:  # bytes before a head
            self.start_head_clock()
        self.body_bytes = 0
        super().data_received(data)
        if self.in_head and not self.transport.is_closing():
            # The bytes of this read that were not body belong to the head being
            # received (a pipelined head behind a body: its framing counts too).
            self.head_bytes += len(data) - self.body_bytes
            self.line_done = self.line_done or data.find(b"\n") >= 0
            refusal = head_too_large(self.head_bytes, self.line_done)
            if refusal is not None:
                self.refuse(refusal)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.in_message = self.in_head = True
        self.line_done, self.head_bytes = False, 0
        if self.head_clock.deadline is None:
            self.start_head_clock()

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)
        super().on_body(body)

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.head_clock.deadline = None  # (stop_head_clock)
        # uvicorn makes the cycle by its module's name: a `Cycle` (its send cheaper),
        # built as one (a class changed afterwards slows every attribute it has).
        names = vars(httptools_impl)
        names["RequestResponseCycle"] = Cycle
        before = self.cycle
        try:
            super().on_headers_complete()
        finally:
            names["RequestResponseCycle"] = RequestResponseCycle
        cycle = self.cycle
        if cycle is None or cycle is before:  # no new cycle (an upgrade)
            return
        cycles = self.cycles
        while cycles and cycles[0].response_complete:  # (they complete in order)
            del cycles[0]
        cycles.append(cycle)
        if self.draining:
            cycle.keep_alive = False
        if self.scope.get("http_version") == "1.0":
            close_delimited(cycle)
        # Its head waits for the body's first piece; the app's task has not run yet.
        cycle.transport = CorkedTransport(self.transport, self.loop)
        cycle.scope[ON_GONE] = []

    def connection_lost(self, exc: Exception | None) -> None:
        # uvicorn tells only its newest cycle (`self.cycle`) that the client is gone.
        # With pipelined requests that is a request still queued, while the one being
        # answered never hears of it: its receive() waits forever and its send()
        # writes into a closed transport, so an endless upstream stream went on with
        # nobody reading. Every unfinished cycle of the connection is told.
        self.head_clock.stop()
        self.idle_clock.stop()
        for cycle in self.cycles:
            if not cycle.response_complete:
                tell_gone(cycle)
        super().connection_lost(exc)

    def on_message_complete(self) -> None:
        self.in_message = False
        super().on_message_complete()

    def start_head_clock(self) -> None:
        self.head_clock.set(self.loop.time() + header_timeout())

    def stop_head_clock(self) -> None:
        self.head_clock.deadline = None

    def head_timed_out(self) -> None:
        if self.transport.is_closing():
            return
        if self.in_head:
            self.refuse(HeadTimeout())
        else:  # nothing sent: closed quietly, as nginx does
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to what httptools cannot parse."""
        self.refuse(BadRequest(msg))

    def refuse(self, exc: ProxyError) -> None:
        """Answer `exc`, then drain what the client still sends for LINGER and close:
        closing with unread bytes resets the connection, losing the answer."""
        self.stop_head_clock()
        self.flush()
        self.refused = True
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # A body httptools cannot parse, under a request the app is answering:
            # the app hears the client gone, and the connection closes as uvicorn's.
            if not cycle.response_started:
                self.transport.write(raw_problem(exc))
            tell_gone(cycle)
            self.transport.close()
            return
        self.transport.write(raw_problem(exc))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER, self.transport.close)

    def eof_received(self) -> bool | None:
        if self.refused:
            self.transport.close()
        return super().eof_received()  # type: ignore[no-any-return]


def tell_gone(cycle: Any) -> None:
    """Tell an unfinished cycle's app that its client is gone: uvicorn's flag and
    event (its receive() says http.disconnect) and, once, the app's ON_GONE callables."""
    cycle.disconnected = True
    cycle.message_event.set()
    for callback in cycle.scope.pop(ON_GONE, ()):
        callback()


_NO_BODY = frozenset({204, 304})


def close_delimited(cycle: Any) -> None:
    """An HTTP/1.0 client's response without Content-Length ends when the connection
    closes (RFC 9112 6.3, RFC 1945 7.2.2): HTTP/1.0 has no chunked coding, yet
    uvicorn's httptools protocol chunks any response whose length it does not know,
    whatever the request's version (its h11 protocol does it right). The body is
    written as it comes and the connection closed after it: uvicorn's own length
    bookkeeping is told, message by message, that this piece is the rest."""
    send = cycle.send
    state = {"close": False}

    async def send_close_delimited(message: Any) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            framed = any(name.lower() in (b"content-length", b"transfer-encoding")
                         for name, _ in message.get("headers", ()))
            if (not framed and cycle.scope["method"] != "HEAD"
                    and message["status"] not in _NO_BODY):
                state["close"] = True
                cycle.chunked_encoding = False
                cycle.keep_alive = False  # uvicorn writes `connection: close`, then closes
        elif kind == "http.response.body" and state["close"]:
            cycle.expected_content_length = len(message.get("body", b""))
        await send(message)

    cycle.send = send_close_delimited


class WebSocketProtocol(WebSocketsSansIOProtocol):
    def shutdown(self) -> None:
        start_clock()
        if DRAIN.armed and self.handshake_complete and not self.close_sent:
            return  # open: the app closes it with 1001 at the deadline
        super().shutdown()
