"""Issue 16's framing findings in the HTTP/1.1 client, byte by byte.

- Every byte 0x00-0x20 and DEL before, after and around a Transfer-Encoding or
  Content-Length value, fed whole and split at every point: where h11 and
  llhttp read the message apart, the client refuses; where they agree, it
  reads what they read (or refuses: never a third reading).
- An HTTP/1.0 response with Transfer-Encoding never leaves a reusable connection.
- The head, trailer-section and chunk-size-line limits do not depend on how
  the bytes arrived: the same bytes in one read or in two get the same answer.
"""

from __future__ import annotations

import pytest

from dualproxy.http1 import ClientConnection, EndOfMessage, RemoteProtocolError, Response
from dualproxy.http1.chunked import MAX_HEAD
from tests.fuzz_references import Kind
from tests.fuzz_strategies import Exchange
from tests.test_http1_fuzz import check, references_disagree, run_dualproxy, run_h11, run_llhttp

AROUND = [bytes([b]) for b in [*range(0x21), 0x7F]]
FIELDS = {b"Transfer-Encoding": (b"chunked", b"5\r\nhello\r\n0\r\n\r\n"),
          b"Content-Length": (b"5", b"hello")}


@pytest.mark.parametrize("name", list(FIELDS))
@pytest.mark.parametrize("where", ["before", "after", "both"])
def test_every_control_or_space_byte_around_a_framing_value(name: bytes, where: str) -> None:
    value, body = FIELDS[name]
    refused = []
    for byte in AROUND:
        framed = {"before": byte + value, "after": value + byte, "both": byte + value + byte}
        stream = b"HTTP/1.1 200 OK\r\n" + name + b":" + framed[where] + b"\r\n\r\n" + body
        for eof in (False, True):
            for cut in range(0, len(stream), 7):
                exchange = Exchange(b"GET", stream, (cut,), eof)
                check(exchange)  # the fuzz's rules, disagreement => refusal included
                refs = {"h11": run_h11(b"GET", exchange.pieces, eof),
                        "llhttp": run_llhttp(b"GET", exchange.pieces, eof)}
                mine = run_dualproxy(b"GET", exchange.pieces, eof)
                if references_disagree(refs):  # type: ignore[arg-type]
                    assert mine.kind is Kind.REJECTED
                    refused.append(byte)
    if name == b"Transfer-Encoding" and where != "before":
        assert b"\t" in refused  # the tab the issue found is among them


def read(stream: bytes, cut: int | None = None) -> tuple[ClientConnection, list[object]]:
    """Feed `stream` (whole, or in two pieces at `cut`); the events until the end."""
    conn = ClientConnection()
    conn.send_request(b"GET", b"/", [(b"host", b"u")])
    pieces = [stream] if cut is None else [stream[:cut], stream[cut:]]
    events: list[object] = []
    for piece in pieces:
        conn.receive_data(piece)
        while (event := conn.next_event()).__class__.__name__ != "_NeedData":
            events.append(event)
            if isinstance(event, EndOfMessage):
                return conn, events
    return conn, events


@pytest.mark.parametrize("connection", [b"keep-alive", b"Keep-Alive, foo"])
def test_an_http_1_0_response_with_transfer_encoding_is_never_reused(connection: bytes) -> None:
    conn, events = read(b"HTTP/1.0 200 OK\r\nConnection: " + connection + b"\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    assert isinstance(events[-1], EndOfMessage)
    assert not conn.reusable  # RFC 9112 6.1: close after it
    framed, _ = read(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 3\r\n\r\nabc")
    assert framed.reusable  # the length-framed HTTP/1.0 keep-alive stays reusable


def head_of(size: int) -> bytes:
    """A response head of exactly `size` bytes, CRLFCRLF included, then a body."""
    start = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Pad: "
    return start + b"a" * (size - len(start) - 4) + b"\r\n\r\nok"


def outcome(stream: bytes, cut: int | None) -> str:
    try:
        _, events = read(stream, cut)
    except RemoteProtocolError as exc:
        return f"refused: {exc}"
    return "read" if any(isinstance(e, Response) for e in events) else "waiting"


@pytest.mark.parametrize("size", [MAX_HEAD - 1, MAX_HEAD, MAX_HEAD + 1, 70_000])
def test_the_head_limit_does_not_depend_on_read_sizes(size: int) -> None:
    stream = head_of(size)
    answers = {outcome(stream, cut) for cut in (None, 1, 66_000 if size > 66_000 else size - 3,
                                                size - 1, size - 2, MAX_HEAD)}
    assert answers == ({"read"} if size <= MAX_HEAD else {"refused: response head too large"})


@pytest.mark.parametrize("extra", [-1, 0, 1, 4000])
def test_the_trailer_limit_does_not_depend_on_read_sizes(extra: int) -> None:
    start = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n"
    # a trailer section of MAX_HEAD + extra bytes, in two lines, blank line excluded
    first = b"A: " + b"a" * 40_000 + b"\r\n"
    second = b"B: " + b"b" * (MAX_HEAD + extra - len(first) - 5) + b"\r\n"
    stream = start + first + second + b"\r\n"
    cuts = (None, len(start) + 10, len(start) + len(first) + 100, len(stream) - 1)
    answers = {outcome(stream, cut) for cut in cuts}
    if extra <= 0:
        assert answers == {"read"}
    else:
        assert len(answers) == 1 and answers.pop().startswith("refused")


@pytest.mark.parametrize("length", [4095, 4096, 4097, 6000])
def test_the_chunk_size_line_limit_does_not_depend_on_read_sizes(length: int) -> None:
    line = b"1;" + b"e" * (length - 2)
    stream = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + line
              + b"\r\nx\r\n0\r\n\r\n")
    at = stream.index(line)
    answers = set()
    for cut in (None, at + 5, at + length, at + length + 1):
        try:
            _, events = read(stream, cut)
            answers.add("read" if isinstance(events[-1], EndOfMessage) else "waiting")
        except RemoteProtocolError:
            answers.add("refused")
    assert answers == ({"read"} if length <= 4096 else {"refused"})
