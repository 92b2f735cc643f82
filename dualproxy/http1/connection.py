"""One HTTP/1.1 client connection as a sans-IO state machine: bytes in, events out.

h11's idea at a fraction of its cost. The drivers (`aio`, `sync`) only move
bytes and wait; every decision lives here: how the request is framed, how the
response head is parsed and its body decoded, whether the upload must stop
(the upstream answered or left), whether the connection may carry another
request (`reusable`) and whether a failed request may be sent again on a fresh
connection (`may_retry`). Strict where leniency would let a response smuggle or
poison a pooled connection: bad lengths, chunk sizes and header lines are
`RemoteProtocolError`s, and after any error the connection is never reused.

Whole reads of a Content-Length or close-delimited body are handed back
uncopied (`Data(data)` is the very bytes object given to `receive_data`).
"""

from __future__ import annotations

import re
from collections import deque

from ..framing import (
    CHUNKED,
    CLOSE,
    FRAMING_SIZES,
    LENGTH,
    NONE,
    UNFRAMED,
    Framing,
    FramingError,
    keeps_alive,
    parse_framing,
    request_body,
    response_body,
)
from ..wire import WireError, head_problem, serialised_head_ok
from .chunked import BAD_BYTE, BARE_EOL, MAX_HEAD, MAX_PIECE, TOKEN_CHARS, ChunkedDecoder
from .errors import LocalProtocolError, RemoteProtocolError

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) (\d{3})(?: ([^\r\n]*))?\Z")
# As bytes.translate deletion sets (a C loop over the head, where a regex costs
# ten times as much): the bytes of a field name (a token) and the control bytes
# no head may hold (chunked.BAD_BYTE's), each derived from its one regex.
_TCHAR = bytes(b for b in range(256) if re.fullmatch(TOKEN_CHARS, bytes((b,))))
_CONTROL = bytes(b for b in range(256) if BAD_BYTE.match(bytes((b,))))
# As bytes.translate tables that map what may not be there to NUL (and NUL to
# itself): any byte a name may not hold; any control byte, CR and LF included,
# which a line may not hold once split on its CRLF.
_IN_NAME = bytes(b if b in _TCHAR else 0 for b in range(256))
_IN_LINE = bytes(0 if b in _CONTROL or b in b"\r\n" else b for b in range(256))
# The lengths of the names `parse_framing` reads (content-length and so on).
_FRAMING_SIZES = FRAMING_SIZES

# A Transfer-Encoding line whose value ends in HTAB (OWS before the CR): h11 and
# this codec read `chunked`, llhttp reads the body to the close. Of the bytes
# 0x00-0x20 and DEL around a framing value, the only one the references read
# differently (the others both refuse, or both take as OWS; tests/test_framing_bytes).
_TE_TRAILING_TAB = re.compile(rb"(?i)\ntransfer-encoding:[^\r]*\t[ \t]*\r")

_KNOWN_INTERIM = frozenset({100, 102, 103})
_KEEP_CAPACITY = 65536  # a pooled connection's receive buffer may keep this much
# states of the response side
_HEAD, _BODY, _DONE, _ERROR = 0, 1, 2, 3


class Response:
    """A response head: interim (1xx but 101) ones come first, then the final one."""

    __slots__ = ("status", "reason", "http_version", "headers", "interim", "framing")

    def __init__(self, status: int, reason: bytes, http_version: bytes,
                 headers: list[tuple[bytes, bytes]], framing: Framing | None = None) -> None:
        self.status = status
        self.reason = reason
        self.http_version = http_version
        self.headers = headers
        self.framing = framing  # how the codec frames the body (parse_framing of headers)
        # a 1xx head other than 101: the final head follows on the same request
        self.interim = status < 200 and status != 101

    def __repr__(self) -> str:
        return f"Response(status={self.status}, headers={self.headers!r})"


class Data:
    """Body bytes (never content-decoded)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __repr__(self) -> str:
        return f"Data({self.data!r})"


class EndOfMessage:
    """The response body ended as framed."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "EndOfMessage()"


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()
_END = EndOfMessage()
Event = Response | Data | EndOfMessage | _NeedData


def _field_lines(block: bytes, start: int) -> list[tuple[bytes, bytes]]:
    """The header lines of a head (`block[start:]`, each line ending in CRLF) as
    (name, value) pairs: `token ":" OWS value OWS`, OWS trimmed. A line that is
    not one (obs-fold, a bare CR or LF, no colon, a bad name) is a protocol error."""
    lines = block.count(b"\r\n")
    if block.count(b"\r") != lines or block.count(b"\n") != lines:  # a bare CR or LF
        raise RemoteProtocolError("malformed header line")
    fields = []
    for line in block[start:-2].split(b"\r\n") if start < len(block) else ():
        name, colon, value = line.partition(b":")
        if not name or not colon:
            raise RemoteProtocolError("malformed header line")
        fields.append((name, value.strip(b" \t")))
    # every name a token: nothing left once the token bytes are deleted
    if b"".join([name for name, _ in fields]).translate(None, _TCHAR):
        raise RemoteProtocolError("malformed header line")
    return fields


def _checked_head(block: bytes) -> tuple[re.Match[bytes], list[tuple[bytes, bytes]]]:
    """The status line's match and the header lines of a head (`block`: the status
    line and the field lines, each ending in CRLF), every byte checked: no control
    byte, no bare CR or LF, a status line, `token ":" OWS value OWS` lines."""
    eol = block.find(b"\r\n")
    if len(block.translate(None, _CONTROL)) != len(block):
        raise RemoteProtocolError("control character in response head")
    match = _STATUS_LINE.match(block, 0, eol)
    if match is None:
        raise RemoteProtocolError("malformed status line")
    return match, _field_lines(block, eol + 2)


def _parse_head(block: bytes) -> tuple[re.Match[bytes], list[tuple[bytes, bytes]],
                                       list[tuple[bytes, bytes]]]:
    """`_checked_head`'s answer, and the framing fields among the header lines
    (those `parse_framing` reads), in fewer passes over the bytes: one check of
    every line's bytes and one of the names, in bulk. A head it cannot take goes
    to `_checked_head`, which raises what is wrong."""
    lines = block.split(b"\r\n")  # the status line, the field lines, b""
    # no control byte, nor a bare CR or LF, once the CRLFs are gone
    if not b"".join(lines).translate(_IN_LINE).find(b"\0") < 0:
        match, fields = _checked_head(block)  # raises
        return match, fields, fields
    status = _STATUS_LINE.match(lines[0])
    fields = []
    framing = []
    names = []
    for line in lines[1:-1]:
        name, colon, value = line.partition(b":")
        if not colon:
            break
        field = (name, value.strip(b" \t"))
        fields.append(field)
        names.append(name)
        if len(name) in _FRAMING_SIZES:
            framing.append(field)
    else:
        if (status is not None and b"" not in names
                and b"".join(names).translate(_IN_NAME).find(b"\0") < 0):
            return status, fields, framing
    match, fields = _checked_head(block)  # raises
    return match, fields, fields


class ClientConnection:
    """The client side of one upstream connection, one request at a time."""

    def __init__(self) -> None:
        self.cycles = 0          # requests started on this connection
        self.eof = False
        self.broken: str | None = None  # why reading failed (connection_broken)
        self._buf = bytearray()  # unparsed bytes (head, chunked body, strays)
        # While a Content-Length or close-delimited body streams, whole reads
        # queue here as given and go out uncopied; `_buf` is older and drains first.
        self._queue: deque[bytes] = deque()
        self.buffered = 0        # bytes in the queue
        self._start()

    def _start(self) -> None:
        self._method = b"GET"
        self._out = NONE         # request body framing
        self._out_left = 0
        self._sent_whole = True  # the request went out entirely (no body: at once)
        self.upload_stopped = False
        self._keep = True        # neither side said close
        self._answered = False   # a response byte arrived during this cycle
        self._state = _HEAD
        self._in = NONE
        self._left = 0
        self._chunked: ChunkedDecoder | None = None
        self._eom = False        # EndOfMessage still to hand out
        self._written_nothing = False
        self._body_started = False

    # -- request side ---------------------------------------------------------------

    def send_request(self, method: bytes, target: bytes,
                     headers: list[tuple[bytes, bytes]]) -> bytes:
        """The request head to write, headers exactly as given (nothing added)."""
        if self.cycles:
            if not self.reusable:
                raise LocalProtocolError("this connection cannot carry another request")
            self._start()
        self.cycles += 1
        parts = [method, b" ", target, b" HTTP/1.1\r\n"]
        framing_fields = []  # the fields parse_framing reads, met on the way
        for field in headers:
            name, value = field
            parts += (name, b": ", value, b"\r\n")
            if len(name) in _FRAMING_SIZES:
                framing_fields.append(field)
        parts.append(b"\r\n")
        head = b"".join(parts)
        if not serialised_head_ok(head, headers):
            # the last step before the wire: whoever made this head, it is not written
            problem = head_problem(target, headers, method) or WireError("header", "bad head")
            self._keep = False
            raise LocalProtocolError(str(problem)) from problem
        try:
            framing = parse_framing(framing_fields) if framing_fields else UNFRAMED
        except FramingError as exc:
            raise LocalProtocolError(str(exc)) from None
        self._method = method
        self._out, self._out_left = request_body(framing)
        self._sent_whole = self._out == NONE
        self._keep = b"close" not in framing.connection
        return head

    @property
    def expects_body(self) -> bool:
        """Is a request body to be sent now (send_body/end_body to follow)? Not when
        the head announced none, nor when the head could not be written."""
        return self._out != NONE and not self.upload_stopped

    def _stop_upload(self) -> bool:
        # The upstream answered (or left) before the upload ended: stop sending;
        # it may not have read what was sent, so the connection is never reused.
        if self._answered or self.eof:
            self.upload_stopped = True
        return self.upload_stopped

    def send_body(self, piece: bytes) -> bytes:
        """Framed bytes to write for one body piece; b"" when nothing is to be written
        (an empty piece, or the upload stopped: see `upload_stopped`)."""
        return b"".join(self.send_body_parts(piece))

    def send_body_parts(self, piece: bytes) -> tuple[bytes, ...]:
        """`send_body`'s bytes in parts, the piece among them uncopied (a driver with
        a gathering write sends them so: a chunk's framing copied each 64 KiB piece
        once more); () when nothing is to be written."""
        self._body_started = True
        if not piece or self._stop_upload():
            return ()
        if self._out == CHUNKED:
            return (b"%x\r\n" % len(piece), piece, b"\r\n")
        left = self._out_left - len(piece)
        if left < 0:  # raised before a byte of the piece is written
            self._keep = False
            raise LocalProtocolError("request body longer than its Content-Length")
        self._out_left = left
        return (piece,)

    def end_body(self) -> bytes:
        """What ends the body on the wire: b"0\\r\\n\\r\\n" when chunked, else b""."""
        if self._out == CHUNKED:
            if self._stop_upload():
                return b""
            self._sent_whole = True
            return b"0\r\n\r\n"
        if self._out_left and not self.upload_stopped:
            self._keep = False
            raise LocalProtocolError("request body shorter than its Content-Length")
        self._sent_whole = not self.upload_stopped
        return b""

    def write_failed(self, nothing_written: bool = False) -> None:
        """The driver could not write (the upstream left): stop sending, read what
        came back. `nothing_written`: not one byte of this request went out."""
        self.upload_stopped = True
        self._keep = False
        self._written_nothing = self._written_nothing or nothing_written

    @property
    def nothing_sent(self) -> bool:
        """Did not one byte of this request go out (the upstream had left before)?"""
        return self._written_nothing and not self._body_started

    def may_retry(self) -> bool:
        """May this failed request be sent again on a fresh connection? Only if no
        byte of it left, or if it is idempotent, bodiless and got no response byte
        on a reused connection (the upstream closed it as we sent)."""
        if self.nothing_sent:
            return True
        return (self.cycles > 1 and self._out == NONE and self._method in IDEMPOTENT
                and not self._answered)

    # -- response side --------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes from the upstream; b"" means it closed its side."""
        if not data:
            self.eof = True
            return
        if self.eof:
            return
        self._answered = True
        if self._state == _BODY and not self._buf and self._in != CHUNKED:
            self._queue.append(data)
            self.buffered += len(data)
        else:
            self._buf += data

    def connection_broken(self, reason: str) -> None:
        """Reading failed (a reset, a broken pipe, TLS cut without close_notify):
        an end like EOF, except that it never completes a close-delimited body,
        whose only end is a clean close (RFC 9112 6.3: else it is incomplete)."""
        self.broken = self.broken or reason
        self.eof = True

    @property
    def pending(self) -> int:
        """Received bytes not handed out yet (for the drivers' backpressure)."""
        return len(self._buf) + self.buffered

    @property
    def done(self) -> bool:
        """The response's last body byte has been handed out (EndOfMessage is next)."""
        return self._state == _DONE

    def next_event(self) -> Event:
        """The next event, or NEED_DATA. Raises RemoteProtocolError on bad input."""
        state = self._state
        if state == _BODY:
            return self._body_event()
        if state == _HEAD:
            try:
                return self._head_event()
            except RemoteProtocolError:
                self._state = _ERROR
                raise
        if state == _DONE:
            if self._eom:
                self._eom = False
                return _END
            return NEED_DATA
        raise RemoteProtocolError("the connection failed earlier")

    def take_trailing(self) -> bytes:
        """The bytes received after the response, handed over whole: after a 101
        they are the first bytes of the other protocol (h11's `trailing_data`)."""
        data = bytes(self._buf) + b"".join(self._queue)
        self._buf.clear()
        self._queue.clear()
        self.buffered = 0
        return data

    @property
    def reusable(self) -> bool:
        """May this connection carry another request now? Only after a cleanly
        framed, fully read response with nothing after it, a whole request, and
        no `close` from either side."""
        return (self._state == _DONE and self._keep and self._sent_whole
                and not self.upload_stopped and not self.eof and not self._buf
                and not self._queue)

    def _fail(self, message: str) -> RemoteProtocolError:
        self._state = _ERROR
        return RemoteProtocolError(message)

    def _head_event(self) -> Event:
        buf = self._buf
        if not buf and not self.eof:
            return NEED_DATA  # asked right after the request went out: nothing to scan yet
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEAD:
                raise RemoteProtocolError("response head too large")
            if BARE_EOL.search(buf):
                raise RemoteProtocolError("bare CR or LF in response head")
            if self.eof:
                raise RemoteProtocolError("upstream closed without a response" + (
                    f" ({self.broken})" if self.broken else ""))
            return NEED_DATA
        if end + 4 > MAX_HEAD:  # however the head arrived: a limit is not a read size
            raise RemoteProtocolError("response head too large")
        block = bytes(buf[:end + 2])  # status line and header lines, each ending in CRLF
        del buf[:end + 4]
        match, headers, framing_fields = _parse_head(block)
        minor, code, reason = match.groups()
        status = int(code)
        if status < 100:
            raise RemoteProtocolError("malformed status code")
        try:
            framing = parse_framing(framing_fields)
        except FramingError as exc:
            raise RemoteProtocolError(str(exc)) from None
        if framing.chunked and _TE_TRAILING_TAB.search(block):
            raise RemoteProtocolError("Transfer-Encoding ends in a tab: parsers disagree")
        event = Response(status, reason or b"", b"HTTP/1." + minor, headers, framing)
        if not keeps_alive(framing, int(minor)) or (framing.chunked and minor == b"0"):
            # RFC 9112 6.1: after an HTTP/1.0 message with Transfer-Encoding the
            # connection closes (an interim head that says close counts too)
            self._keep = False
        if event.interim:
            if (status not in _KNOWN_INTERIM and self._method != b"HEAD"
                    and (framing.chunked or framing.length)):
                # RFC 9110 8.6, RFC 9112 6.1: never sent on a 1xx; llhttp then reads
                # a body (not after 100, 102, 103 nor for HEAD), h11 does not: ambiguous.
                raise RemoteProtocolError("an interim response announces a body")
            return event
        self._in, self._left = response_body(framing, status, self._method)
        if status == 101 or self._in == CLOSE:
            self._keep = False  # 101: the connection now speaks another protocol
        if self._in == CHUNKED:
            self._chunked = ChunkedDecoder()
        if self._in == NONE or (self._in == LENGTH and not self._left):
            self._state, self._eom = _DONE, True
        else:
            self._state = _BODY
        return event

    def _body_event(self) -> Event:
        decoder = self._chunked
        if decoder is not None:
            try:
                data = decoder.decode(self._buf)
            except RemoteProtocolError:
                self._state = _ERROR
                raise
            if decoder.done:
                # the last piece goes out with the state already DONE, so a
                # driver can check the connection in before passing it on
                self._body_done()
                self._keep = self._keep and decoder.keep_alive
                if not data:
                    return _END
                self._eom = True
            if data:
                return Data(data)
            if self.eof:
                raise self._fail("upstream closed inside a chunked body")
            return NEED_DATA
        buf = self._buf
        if buf:
            n = len(buf) if self._in == CLOSE else min(self._left, len(buf))
            n = min(n, MAX_PIECE)
            if n == len(buf):
                data = bytes(buf)
                buf.clear()
            else:
                data = bytes(buf[:n])
                del buf[:n]
        elif self._queue:
            data = self._queue.popleft()
            self.buffered -= len(data)
            if self._in == LENGTH and len(data) > self._left:
                self._buf += data[self._left:]  # bytes past the body: never reused
                data = data[:self._left]
        elif self.eof:
            if self._in == CLOSE and self.broken is None:
                self._state = _DONE
                return _END
            if self.broken is not None:
                raise self._fail(f"the upstream connection broke mid-body: {self.broken}")
            raise self._fail("upstream closed before the end of the body")
        else:
            return NEED_DATA
        if self._in == LENGTH:
            self._left -= len(data)
            if not self._left:
                self._body_done()
                self._eom = True
        return Data(data)

    def _body_done(self) -> None:
        self._state = _DONE
        if not self._buf and self._buf.__sizeof__() > _KEEP_CAPACITY:
            self._buf = bytearray()  # an emptied bytearray keeps its capacity: drop it
