"""The two reference HTTP/1.1 response parsers the fuzz test compares dualproxy with.

Each runner takes the request method, the response bytes in the pieces they
arrive in, and whether the peer then closes (EOF), and returns an `Outcome`:
the final (non-1xx) response as that parser exposes it, or its rejection.

- h11 (`h11.Connection(h11.CLIENT)`), told the request it answers.
- llhttp through `httptools.HttpResponseParser` (what uvicorn uses). httptools
  has no call for EOF, which ends a close-delimited body, so `llhttp_finish` is
  called through ctypes on the parser's own `llhttp_t` (found once, by value,
  see `_llhttp_pointer`). httptools cannot tell llhttp that the request was a
  HEAD (its headers-complete callback only returns 1 on upgrades), so llhttp
  gives no verdict on HEAD exchanges: `run_llhttp` returns None for them.
"""

from __future__ import annotations

import ctypes
import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

import h11
import httptools
import httptools.parser.parser as _httptools_parser

Headers = tuple[tuple[bytes, bytes], ...]


class Kind(enum.Enum):
    COMPLETE = "complete"  # the final response and its whole body were read
    PENDING = "pending"    # no EOF and the message is not over yet: waiting for bytes
    REJECTED = "rejected"  # a protocol error, or EOF before the message ended


@dataclass(frozen=True)
class Outcome:
    """What one parser made of one exchange (the final response only)."""

    kind: Kind
    status: int | None = None
    headers: Headers = ()
    body: bytes = b""
    # After the message: may the connection carry another? Never when EOF ended it.
    reusable: bool | None = None
    interim: tuple[int, ...] = ()  # 1xx statuses before the final response
    why: str = field(default="", compare=False)
    version: bytes = b""           # the final response's, b"1.0" or b"1.1"

    @property
    def message(self) -> tuple[int | None, Headers, bytes]:
        return self.status, self.headers, self.body


def canonical_headers(headers: Sequence[tuple[bytes, bytes]]) -> Headers:
    """Header fields as the parsers' common denominator: names lowercased (h11
    lowercases), trailing whitespace off values (llhttp keeps it, yet it is not
    part of the value: RFC 9112 5), Transfer-Encoding lowercased (h11 does),
    equal Content-Length values merged into one field (h11 keeps one field for
    `5, 5` or two equal lines). Anything else stays as parsed, in order."""
    out: list[tuple[bytes, bytes]] = []
    seen_length = False
    for name, value in headers:
        lname = name.lower()
        value = value.rstrip(b" \t")
        if lname == b"transfer-encoding":
            value = value.lower()
        elif lname == b"content-length":
            if seen_length:
                continue
            seen_length = True
            value = value.split(b",")[0].strip()
        out.append((lname, value))
    return tuple(out)


# ------------------------------------------------------------------------------------ h11


def run_h11(method: bytes, pieces: Sequence[bytes], eof: bool) -> Outcome:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=65536)
    conn.send(h11.Request(method=method, target=b"/", headers=[(b"host", b"example")]))
    conn.send(h11.EndOfMessage())
    interim: list[int] = []
    head: h11.Response | None = None
    body: list[bytes] = []

    def partial(kind: Kind, why: str = "") -> Outcome:
        status = head.status_code if head else None
        headers = canonical_headers(head.headers.raw_items()) if head else ()
        return Outcome(kind, status, headers, b"".join(body), None, tuple(interim), why,
                       head.http_version if head else b"")

    for piece in [*pieces, b""] if eof else pieces:
        try:
            conn.receive_data(piece)
        except h11.RemoteProtocolError as exc:  # data after EOF
            return partial(Kind.REJECTED, f"h11: {exc}")
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                return partial(Kind.REJECTED, f"h11: {exc}")
            if event is h11.NEED_DATA:
                break
            if isinstance(event, h11.InformationalResponse):
                interim.append(event.status_code)
            elif isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                body.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                # h11 can start a next cycle only from DONE; MUST_CLOSE means not.
                reusable = conn.their_state is h11.DONE and piece != b""
                return Outcome(Kind.COMPLETE, head.status_code,
                               canonical_headers(head.headers.raw_items()),
                               b"".join(body), reusable, tuple(interim), "", head.http_version)
            else:  # ConnectionClosed (EOF before any response) or PAUSED
                return partial(Kind.REJECTED, f"h11: {event!r}")
    if eof:
        return partial(Kind.REJECTED, "h11: EOF inside the message")
    return partial(Kind.PENDING)


# --------------------------------------------------------------------------------- llhttp

# PyDLL: keep the GIL, llhttp_finish may call back into httptools' Cython code.
_lib = ctypes.PyDLL(_httptools_parser.__file__)
_lib.llhttp_finish.argtypes = [ctypes.c_void_p]
_lib.llhttp_finish.restype = ctypes.c_int
_lib.llhttp_get_status_code.argtypes = [ctypes.c_void_p]
_lib.llhttp_get_status_code.restype = ctypes.c_int
_lib.llhttp_get_type.argtypes = [ctypes.c_void_p]
_lib.llhttp_get_type.restype = ctypes.c_int
_HTTP_RESPONSE = 2
_HPE_OK = 0


class _Stop(Exception):
    """Raised from on_message_complete: the final response is over, parse no further."""


class _Recorder:
    """httptools protocol object: collects the callbacks of one exchange."""

    def __init__(self) -> None:
        self.parser: httptools.HttpResponseParser | None = None
        self.interim: list[int] = []
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.status: int | None = None
        self.version = b""
        self.final = False
        self.reusable: bool | None = None

    def on_message_begin(self) -> None:
        self.headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.final:  # trailers come through on_header too, after the head
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self.interim.append(status)
        else:
            self.final = True
            self.status = status
            self.version = self.parser.get_http_version().encode()

    def on_body(self, data: bytes) -> None:
        self.body.append(data)

    def on_message_complete(self) -> None:
        if self.final:
            assert self.parser is not None
            self.reusable = self.parser.should_keep_alive()
            raise _Stop()


def _find_offset() -> int:
    """Where an httptools parser object keeps its `llhttp_t *`.

    httptools keeps it in its first C field, which Python cannot see; the
    field is found once by value: the pointer-sized slot whose target reports
    the type and the status code (263, unlikely anywhere else) of a head just
    parsed.
    """
    probe = httptools.HttpResponseParser(object())  # no callbacks
    probe.feed_data(b"HTTP/1.1 263 Probe\r\nContent-Length: 9\r\n\r\n")
    for offset in range(16, 80, 8):
        ptr = ctypes.c_void_p.from_address(id(probe) + offset).value
        if (ptr and _lib.llhttp_get_type(ptr) == _HTTP_RESPONSE
                and _lib.llhttp_get_status_code(ptr) == 263):
            return offset
    raise RuntimeError("cannot find llhttp_t inside httptools' parser")


_OFFSET = _find_offset()


def _finish(parser: httptools.HttpResponseParser) -> int:
    """`llhttp_finish` on the parser (an EOF now): llhttp's errno."""
    ptr = ctypes.c_void_p.from_address(id(parser) + _OFFSET).value
    return int(_lib.llhttp_finish(ptr))


def run_llhttp(method: bytes, pieces: Sequence[bytes], eof: bool) -> Outcome | None:
    if method == b"HEAD":
        return None  # httptools cannot skip a HEAD response's body (see the module doc)
    rec = _Recorder()
    parser = httptools.HttpResponseParser(rec)
    rec.parser = parser

    def outcome(kind: Kind, why: str = "") -> Outcome:
        headers = canonical_headers(rec.headers) if rec.final else ()
        return Outcome(kind, rec.status, headers, b"".join(rec.body), rec.reusable,
                       tuple(rec.interim), why, rec.version)

    for piece in pieces:
        try:
            parser.feed_data(piece)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _Stop):
                return outcome(Kind.COMPLETE)
            raise
        except httptools.HttpParserUpgrade:
            return outcome(Kind.REJECTED, "llhttp: upgrade (101)")
        except httptools.HttpParserError as exc:
            return outcome(Kind.REJECTED, f"llhttp: {exc!r}")
    if not eof:
        return outcome(Kind.PENDING)
    errno = _finish(parser)
    if rec.reusable is not None:  # on_message_complete ran inside llhttp_finish
        rec.reusable = False  # ended by EOF
        return outcome(Kind.COMPLETE)
    if errno != _HPE_OK or rec.status is None:
        return outcome(Kind.REJECTED, f"llhttp: EOF, errno {errno}")
    return outcome(Kind.REJECTED, "llhttp: EOF inside the message")
