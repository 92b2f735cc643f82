"""Differential fuzzing of dualproxy's HTTP/1.1 response parser against h11 and llhttp.

Hypothesis generates upstream answers (tests/fuzz_strategies.py: from a grammar,
and by mutating a corpus of valid responses byte by byte), feeds them in
random pieces to dualproxy's client codec and to the two references
(tests/fuzz_references.py), and checks:

- where both references read the same final response, dualproxy reads it too:
  same status, header fields (names compared case-insensitively, equal
  Content-Length values merged) and body bytes, unless it rejects the exchange
  for one of the deliberate reasons below;
- where the references disagree or one rejects, dualproxy rejects or reads
  exactly what one accepting reference reads (never a third reading: a third
  reading is a framing disagreement a smuggler can use);
- where neither reference refuses yet they read the framing apart (one finished
  a message the other still reads, or both finished different ones: llhttp
  reads `Transfer-Encoding: chunked<TAB>` to the close, h11 as chunked),
  dualproxy refuses: the next hop could be either;
- dualproxy never waits on a message that a reference finished (when the
  references all wait, dualproxy's reading matches none: the rule above);
- reuse: dualproxy may keep the connection for another request only when every
  reference that read the message would (the safe direction: a connection
  wrongly reused hands one client's leftover bytes to the next request; one
  wrongly closed costs a reconnect). A message that ended by EOF is never
  reusable, whatever a parser says.

Deliberate differences (dualproxy is stricter; rejecting is allowed there even
when both references accept):
- obs-fold: h11 joins folded lines; dualproxy refuses (RFC 9112 5.2 lets a
  recipient reject, and a proxy must not pass a fold on).
- bare LF as a line end: h11 accepts it; dualproxy (and llhttp) refuse: a
  parser that splits lines differently from the next hop can be smuggled past.
- Content-Length together with Transfer-Encoding: h11 lets chunked win; dualproxy
  answers 502 (RFC 9112 6.3 calls it a smuggling attempt) and llhttp refuses.
- 101 to a request that asked no upgrade: 502 (h11 refuses it too).
- control bytes other than HTAB anywhere in a head, the reason phrase included:
  both references let DEL and others through the reason phrase; RFC 9112 4
  allows only HTAB, SP, VCHAR and obs-text there.
- a version other than HTTP/1.0 or HTTP/1.1 in a status line (`HTTP/2.0 200`
  on an HTTP/1.1 connection): both references take any `HTTP/d.d`.
- a Content-Length of 19 digits or more, even where no body follows (204, 304,
  HEAD): dualproxy bounds lengths to 18 digits (an int64, never a bignum);
  h11 takes 20 digits, llhttp anything below 2**64.
Deliberate differences in reuse: h11 never keeps an HTTP/1.0 connection;
dualproxy keeps one that says `Connection: keep-alive` with a length-framed
body (RFC 9112 9.3 and appendix C.2.2), as llhttp does; never one with
Transfer-Encoding (RFC 9112 6.1), which llhttp would keep.

Runs: the suite runs a fixed, derandomized sample (fast, no database);
`DUALPROXY_FUZZ_EXAMPLES=200000 pytest tests/test_http1_fuzz.py
--hypothesis-show-statistics` (or `nox -s fuzz`) runs a long random one.
Inputs that once showed a dualproxy bug stay below as `@example`s.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from hypothesis import HealthCheck, event, example, given, settings

from dualproxy.http1 import (
    NEED_DATA,
    ClientConnection,
    Data,
    EndOfMessage,
    RemoteProtocolError,
    Response,
)
from tests.fuzz_references import Kind, Outcome, canonical_headers, run_h11, run_llhttp
from tests.fuzz_strategies import Exchange, exchanges, mutated_exchanges

LONG_RUN = int(os.environ.get("DUALPROXY_FUZZ_EXAMPLES", "0"))


# ------------------------------------------------------------------------- dualproxy side


def run_dualproxy(method: bytes, pieces: Sequence[bytes], eof: bool) -> Outcome:
    """dualproxy's sans-IO ClientConnection on one exchange, pieces fed as they come."""
    conn = ClientConnection()
    conn.send_request(method, b"/", [(b"host", b"example")])
    status: int | None = None
    headers: tuple[tuple[bytes, bytes], ...] = ()
    version = b""
    body: list[bytes] = []
    interim: list[int] = []

    def outcome(kind: Kind, reusable: bool | None = None, why: str = "") -> Outcome:
        return Outcome(kind, status, headers, b"".join(body), reusable, tuple(interim), why,
                       version)

    for piece in [*pieces, b""] if eof else pieces:
        try:
            conn.receive_data(piece)
            while True:
                event = conn.next_event()
                if event is NEED_DATA:
                    break
                if isinstance(event, Response):
                    if 100 <= event.status < 200 and event.status != 101:
                        interim.append(event.status)
                    else:
                        status, headers = event.status, canonical_headers(event.headers)
                        version = event.http_version.removeprefix(b"HTTP/")
                        if status == 101:  # the core answers 502 (no upgrade was asked)
                            return outcome(Kind.REJECTED, why="dualproxy: 502 for 101")
                elif isinstance(event, Data):
                    body.append(bytes(event.data))
                elif isinstance(event, EndOfMessage):
                    return outcome(Kind.COMPLETE, bool(conn.reusable) and piece != b"")
                else:
                    return outcome(Kind.REJECTED, why=f"dualproxy: event {event!r}")
        except RemoteProtocolError as exc:
            return outcome(Kind.REJECTED, why=f"dualproxy: {exc}")
    return outcome(Kind.REJECTED if eof else Kind.PENDING, why="dualproxy: EOF" if eof else "")


# ------------------------------------------------------------------------------ the rules

_HEAD_END = re.compile(rb"\r?\n\r?\n")
_INTERIM = re.compile(rb"[^\r\n]* 1\d\d")


def _heads(stream: bytes) -> bytes:
    """The stream up to the end of the final response's head, interim heads
    included (roughly: a head ends at the first blank line)."""
    pos = 0
    while True:
        end = _HEAD_END.search(stream, pos)
        if end is None:
            return stream
        if not _INTERIM.match(stream, pos):
            return stream[:end.end()]
        pos = end.end()


def deliberately_stricter(stream: bytes) -> list[str]:
    """The documented reasons (module doc) dualproxy may reject what both accept."""
    head = _heads(stream)  # the heads, interim ones included; no body bytes
    reasons = []
    if re.search(rb"\n[ \t]", head):
        reasons.append("obs-fold")
    if re.search(rb"(?<!\r)\n", head):
        reasons.append("bare LF")
    if re.search(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", head):
        reasons.append("control byte in a head")
    if re.search(rb"HTTP/(?!1\.[01] )", head):
        reasons.append("a version other than HTTP/1.0 or HTTP/1.1")
    if re.search(rb"(?i)\ncontent-length:[ \t]*[0-9]{19}", head):
        reasons.append("a Content-Length of 19 digits or more")
    lowered = head.lower()
    if b"\ncontent-length" in lowered and b"\ntransfer-encoding" in lowered:
        reasons.append("Content-Length with Transfer-Encoding")
    return reasons


def references_disagree(refs: dict[str, Outcome]) -> bool:
    """Neither reference refuses, yet they read the framing apart: one finished a
    message the other still reads (or reads another way). A smuggler's gap: the
    proxy must refuse, whichever of the two the next hop is."""
    if len(refs) < 2 or any(o.kind is Kind.REJECTED for o in refs.values()):
        return False
    done = [o for o in refs.values() if o.kind is Kind.COMPLETE]
    return 0 < len(done) < len(refs) or len({o.message for o in done}) > 1


def divergences(exchange: Exchange, mine: Outcome, refs: dict[str, Outcome]) -> list[str]:
    """What in `mine` breaks the rules of the module doc, given the references' outcomes."""
    done = {name: o for name, o in refs.items() if o.kind is Kind.COMPLETE}
    readings = {o.message for o in done.values()}
    agreed = len(done) == len(refs) and len(readings) == 1
    problems = []
    if references_disagree(refs) and mine.kind is not Kind.REJECTED:
        problems.append("the references disagree and dualproxy did not refuse")
    if mine.kind is Kind.COMPLETE:
        if mine.message not in readings:
            problems.append("dualproxy read a message no reference read")
        llhttp = refs.get("llhttp")
        if mine.reusable and mine.version == b"1.0" and any(
                name == b"transfer-encoding" for name, _ in mine.headers):
            problems.append("dualproxy reuses after an HTTP/1.0 Transfer-Encoding (RFC 9112 6.1)")
        for name, ref in done.items():
            if mine.reusable and not ref.reusable and not (
                    name == "h11" and ref.version == b"1.0"
                    and (llhttp is None or llhttp.kind is not Kind.COMPLETE or llhttp.reusable)):
                problems.append(f"dualproxy reuses the connection, {name} would not")
    elif mine.kind is Kind.PENDING:
        if done:
            problems.append("dualproxy waits on a message a reference finished")
    elif agreed and not deliberately_stricter(exchange.stream):
        problems.append("dualproxy rejects what both references read alike")
    return problems


def describe(exchange: Exchange, mine: Outcome, refs: dict[str, Outcome]) -> str:
    lines = [f"method={exchange.method!r} eof={exchange.eof} pieces={exchange.pieces!r}",
             f"  dualproxy: {mine}"]
    lines += [f"  {name}: {o}" for name, o in refs.items()]
    return "\n".join(lines)


def check(exchange: Exchange) -> list[str]:
    """Assert the rules on one exchange; return labels for hypothesis' statistics."""
    pieces = exchange.pieces
    mine = run_dualproxy(exchange.method, pieces, exchange.eof)
    refs = {"h11": run_h11(exchange.method, pieces, exchange.eof)}
    llhttp = run_llhttp(exchange.method, pieces, exchange.eof)
    if llhttp is not None:
        refs["llhttp"] = llhttp
    problems = divergences(exchange, mine, refs)
    assert not problems, "; ".join(problems) + "\n" + describe(exchange, mine, refs)
    labels = ["dualproxy " + mine.kind.value + ", "
              + ", ".join(f"{name} {o.kind.value}" for name, o in refs.items())]
    if references_disagree(refs):
        labels.append("the references disagree (dualproxy refused)")
    if mine.reusable is False and all(o.reusable for o in refs.values()):
        labels.append("dualproxy closes a connection the references would reuse")
    return labels


# --------------------------------------------------------------------------------- tests

FUZZ_SETTINGS = settings(
    max_examples=LONG_RUN or 1500,
    derandomize=not LONG_RUN,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def found(stream: bytes, eof: bool = False, method: bytes = b"GET") -> Exchange:
    """An input that once showed a dualproxy bug, fed whole."""
    return Exchange(method, stream, (), eof)


_OK = b"HTTP/1.1 200 OK\r\n"
_TE = _OK + b"Transfer-Encoding: chunked\r\n\r\n"


@FUZZ_SETTINGS
@given(exchanges())
# An empty list item: llhttp reads close-delimited, h11 rejects; dualproxy read chunked.
@example(found(_OK + b"Transfer-Encoding: chunked,\r\n\r\n5\r\nhello\r\n0\r\n\r\n", eof=True))
@example(found(_OK + b"Transfer-Encoding: chunked,\r\n\r\n5\r\nhello\r\n0\r\n\r\n"))
# Trailer lines that are no header fields: both references reject.
@example(found(_TE + b"5\r\nhello\r\n0\r\nbad line\r\n\r\n"))
@example(found(_TE + b"0\r\nf\n\r\n\r\n"))
# Bare LF in a head: h11 reads it, llhttp rejects; dualproxy waited for more.
@example(found(b"HTTP/1.1 200 OK\nContent-Length: 0\n\n"))
@example(found(b"HTTP/1.1 200 \r\nContent-Length: 0\n\r\n"))
# A zero-padded chunk size longer than 16 digits: both references read it.
@example(found(_TE + b"00000000000000005\r\nhello\r\n0\r\n\r\n"))
# Framing headers in interim responses (the pre-issue-9 codec ignored them).
@example(found(b"HTTP/1.1 150 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked"
               b"\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
@example(found(b"HTTP/1.1 100 OK\r\nContent-Length: -5\r\n\r\n"
               b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
# More empty Transfer-Encoding items: h11 rejects, llhttp rejects or reads close-delimited.
@example(found(b"HTTP/1.1 469\r\nTransfer-Encoding:  \r\nTransfer-Encoding: chunked\r\n\r\n"
               b"1\r\nx\r\n0\r\n\r\n"))
@example(found(_OK + b"Transfer-Encoding: chunked,,\r\n\r\n1\r\nx\r\n0\r\n\r\n"))
# Whitespace between a chunk size and its extension: both references reject.
@example(found(_TE + b"1\r\nx\r\n0 ;a\r\n\r\n"))
# Framing fields in the trailer section (RFC 9110 6.5.1 forbids them): h11 rejects, llhttp
# rejects the empty one and would not reuse after the other.
@example(found(_TE + b"1\r\nx\r\n0\r\nTransfer-Encoding: \r\n\r\n"))
@example(found(_TE + b"1\r\nx\r\n0\r\nTransfer-Encoding: identity\r\n\r\n"))
# A trailer that says close: llhttp would not reuse the connection.
@example(found(_TE + b"1\r\nx\r\n0\r\nConnection: close\r\n\r\n"))
# Content-Length values equal as numbers, not as strings: both references reject.
@example(found(_OK + b"Content-Length: 00\r\nContent-Length: 0\r\n\r\n"))
@example(found(_OK + b"Content-Length: 0, 00\r\n\r\n"))
# An empty Transfer-Encoding beside a Content-Length (issue 9), here on a 204.
@example(found(b"HTTP/1.1 204 \r\ncontent-length: 0\r\ntransfer-encoding:  \r\n\r\n", eof=True))
def test_response_parser_agrees_with_h11_and_llhttp(exchange: Exchange) -> None:
    for label in check(exchange):
        event(label)


@settings(FUZZ_SETTINGS, max_examples=LONG_RUN or 500)  # a few seconds in the suite
@given(mutated_exchanges())
# issue 16: a tab after chunked (llhttp reads to the close), an HTTP/1.0 chunked reuse.
@example(found(_TE.replace(b"chunked", b"chunked\t") + b"5\r\nhello\r\n0\r\n\r\n", eof=True))
@example(found(_TE.replace(b"chunked", b"chunked\t") + b"5\r\nhello\r\n0\r\n\r\n"))
@example(found(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n"
               b"\r\n3\r\nabc\r\n0\r\n\r\n"))
def test_mutated_responses_agree_or_are_refused(exchange: Exchange) -> None:
    """A corpus of valid responses bent byte by byte (fuzz_strategies.mutated_exchanges):
    the same rules, and where the references read the framing apart, a refusal."""
    for label in check(exchange):
        event(label)


def _both(stream: bytes, eof: bool, cuts: tuple[int, ...] = ()) -> dict[str, Outcome]:
    pieces = Exchange(b"GET", stream, cuts, eof).pieces
    llhttp = run_llhttp(b"GET", pieces, eof)
    assert llhttp is not None
    return {"h11": run_h11(b"GET", pieces, eof), "llhttp": llhttp}


def test_references_are_live() -> None:
    """The comparison has teeth: both references read a plain message, and the
    harness notices a reading that differs from theirs."""
    stream = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    exchange = Exchange(b"GET", stream, (7, 30), False)
    refs = _both(stream, False, exchange.cuts)
    assert {o.message for o in refs.values()} == {(200, ((b"content-length", b"5"),), b"hello")}
    assert all(o.reusable for o in refs.values())
    mine = run_dualproxy(b"GET", exchange.pieces, False)
    assert divergences(exchange, mine, refs) == []
    wrong = Outcome(Kind.COMPLETE, 200, ((b"content-length", b"5"),), b"hell", True)
    assert divergences(exchange, wrong, refs) == ["dualproxy read a message no reference read"]
    reused = Outcome(Kind.COMPLETE, *mine.message, True)
    closing = _both(stream.replace(b"OK\r\n", b"OK\r\nConnection: close\r\n"), False)
    assert divergences(exchange, reused, closing) == [
        "dualproxy read a message no reference read",  # the Connection field differs
        "dualproxy reuses the connection, h11 would not",
        "dualproxy reuses the connection, llhttp would not",
    ]


def test_references_see_eof() -> None:
    """A close-delimited body ends at EOF for both references (llhttp's through
    llhttp_finish), and waits without it; EOF inside a length is a rejection."""
    stream = b"HTTP/1.1 200 OK\r\n\r\nhello"
    assert {(o.kind, o.body, o.reusable) for o in _both(stream, True).values()} == {
        (Kind.COMPLETE, b"hello", False)}
    assert {o.kind for o in _both(stream, False).values()} == {Kind.PENDING}
    short = b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nhello"
    assert {o.kind for o in _both(short, True).values()} == {Kind.REJECTED}
