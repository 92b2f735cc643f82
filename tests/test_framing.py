"""The one framing rule (RFC 9112 section 6), and the codec that reads bodies by it.

Three layers, one table of framing variants: the pure function
(`dualproxy.framing`), the core (request 400s, response 502s) and the sans-IO
`ClientConnection` agree on each; then every variant goes through the proxy on
every pairing, answered by the recording upstream's scripted raw response: a
variant is relayed with exactly its body, or refused with a 502 and its
upstream connection never reused.
"""

from __future__ import annotations

import base64
import json

import pytest

from dualproxy.config import ProxyConfig
from dualproxy.core import IncomingRequest, plan_request, plan_response
from dualproxy.errors import BadGateway, BadRequest
from dualproxy.framing import FramingError, parse_framing
from dualproxy.http1 import NEED_DATA, ClientConnection, Data, EndOfMessage, Response
from dualproxy.http1.errors import LocalProtocolError, RemoteProtocolError
from tests.conftest import ProxyProcess
from tests.rawhttp import exchange, request_bytes
from tests.upstream import Upstream

HELLO = b"hello"
CHUNKED_HELLO = b"5\r\nhello\r\n0\r\n\r\n"
# name -> (framing header lines, body bytes on the wire, the body it frames or None: refused)
VARIANTS: dict[str, tuple[list[bytes], bytes, bytes | None]] = {
    "chunked": ([b"Transfer-Encoding: chunked"], CHUNKED_HELLO, HELLO),
    # An empty list item: llhttp reads close-delimited, h11 (and nginx, Go) refuse: 502.
    "chunked-trailing-comma": ([b"Transfer-Encoding: chunked,"], CHUNKED_HELLO, None),
    "chunked-comma-space": ([b"Transfer-Encoding: chunked, "], CHUNKED_HELLO, None),
    "chunked-leading-comma": ([b"Transfer-Encoding: ,chunked"], CHUNKED_HELLO, None),
    "chunked-leading-space": ([b"Transfer-Encoding:  chunked"], CHUNKED_HELLO, HELLO),
    "chunked-capitalised": ([b"Transfer-Encoding: Chunked"], CHUNKED_HELLO, HELLO),
    "chunked-upper": ([b"Transfer-Encoding: CHUNKED"], CHUNKED_HELLO, HELLO),
    "chunked-and-empty-line": ([b"Transfer-Encoding: chunked", b"Transfer-Encoding: "],
                               CHUNKED_HELLO, None),
    "length": ([b"Content-Length: 5"], HELLO, HELLO),
    "length-list-equal": ([b"Content-Length: 5, 5"], HELLO, HELLO),
    "length-lines-equal": ([b"Content-Length: 5", b"Content-Length: 5"], HELLO, HELLO),
    "empty-coding-and-length": ([b"Transfer-Encoding: ", b"Content-Length: 5"], HELLO, None),
    "length-and-empty-coding": ([b"Content-Length: 5", b"Transfer-Encoding:"], HELLO, None),
    "empty-coding-alone": ([b"Transfer-Encoding:"], HELLO, None),
    "identity-chunked": ([b"Transfer-Encoding: identity, chunked"], CHUNKED_HELLO, None),
    "gzip-chunked": ([b"Transfer-Encoding: gzip, chunked"], CHUNKED_HELLO, None),
    "chunked-gzip": ([b"Transfer-Encoding: chunked, gzip"], CHUNKED_HELLO, None),
    "chunked-twice": ([b"Transfer-Encoding: chunked, chunked"], CHUNKED_HELLO, None),
    "chunked-two-lines": ([b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"],
                          CHUNKED_HELLO, None),
    "chunked-and-length": ([b"Transfer-Encoding: chunked", b"Content-Length: 5"],
                           CHUNKED_HELLO, None),
    "length-list-differs": ([b"Content-Length: 5, 6"], HELLO + b"!", None),
    "length-lines-differ": ([b"Content-Length: 5", b"Content-Length: 6"], HELLO + b"!", None),
    "length-lines-differ-in-zeros": ([b"Content-Length: 05", b"Content-Length: 5"], HELLO, None),
    "length-trailing-comma": ([b"Content-Length: 5,"], HELLO, None),
    "length-empty": ([b"Content-Length: "], HELLO, None),
    "length-sign": ([b"Content-Length: +5"], HELLO, None),
    "length-huge": ([b"Content-Length: 1234567890123456789"], HELLO, None),
}


def lines_to_headers(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    pairs = [line.split(b":", 1) for line in lines]
    return [(name, value.strip()) for name, value in pairs]


def raw_response(name: str) -> bytes:
    lines, body, _ = VARIANTS[name]
    return b"HTTP/1.1 200 OK\r\n" + b"\r\n".join([b"X-Variant: 1", *lines]) + b"\r\n\r\n" + body


def read_all(conn: ClientConnection) -> tuple[Response, bytes]:
    head = conn.next_event()
    assert isinstance(head, Response)
    body = b""
    while True:
        event = conn.next_event()
        if isinstance(event, Data):
            body += event.data
        elif isinstance(event, EndOfMessage):
            return head, body
        else:
            assert event is NEED_DATA
            conn.receive_data(b"")


# -- one rule, three users -----------------------------------------------------------------


@pytest.mark.parametrize("name", list(VARIANTS))
def test_the_framing_function(name: str) -> None:
    lines, _, expected = VARIANTS[name]
    headers = lines_to_headers(lines)
    if expected is None:
        with pytest.raises(FramingError):
            parse_framing(headers)
    else:
        framing = parse_framing(headers)
        assert framing.chunked == any(b"chunked" in line.lower() for line in lines)
        assert framing.length in (None, 5)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_the_codec_reads_each_variant_by_the_rule(name: str) -> None:
    conn = ClientConnection()
    conn.send_request(b"GET", b"/", [(b"Host", b"u")])
    conn.receive_data(raw_response(name))
    expected = VARIANTS[name][2]
    if expected is None:
        with pytest.raises(RemoteProtocolError):
            conn.next_event()
        assert not conn.reusable
        return
    head, body = read_all(conn)
    assert (head.status, body) == (200, expected)
    assert conn.reusable


@pytest.mark.parametrize("name", list(VARIANTS))
def test_the_core_judges_each_variant_by_the_rule(name: str) -> None:
    config = ProxyConfig.build("http://upstream.test")
    lines, _, expected = VARIANTS[name]
    headers = [(n.lower(), v) for n, v in lines_to_headers(lines)]
    incoming = IncomingRequest("POST", b"/", [(b"host", b"proxy.test"), *headers], "127.0.0.1")
    if expected is None:
        with pytest.raises(BadRequest):
            plan_request(config, incoming)
    else:
        plan = plan_request(config, incoming)
        assert plan.has_body
        framing = [h for h in plan.headers if h[0] in (b"content-length", b"transfer-encoding")]
        assert framing in ([(b"content-length", b"5")], [(b"transfer-encoding", b"chunked")])
    plan = plan_request(config, IncomingRequest("GET", b"/", [(b"host", b"p")], "127.0.0.1"))
    if expected is None:
        with pytest.raises(BadGateway):
            plan_response(config, plan, 200, headers)
    else:
        head = plan_response(config, plan, 200, headers)
        assert [h for h in head.headers if h[0] == b"content-length"] in (
            [], [(b"content-length", b"5")])
        assert not any(h[0] == b"transfer-encoding" for h in head.headers)


# -- the codec's other decisions ---------------------------------------------------------


def test_whole_reads_are_passed_on_uncopied() -> None:
    conn = ClientConnection()
    conn.send_request(b"GET", b"/", [(b"Host", b"u")])
    conn.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab")
    assert isinstance(conn.next_event(), Response)
    assert conn.next_event().data == b"ab"  # type: ignore[union-attr]
    piece = b"cdefghij"
    conn.receive_data(piece)
    event = conn.next_event()
    assert isinstance(event, Data) and event.data is piece
    assert conn.done and isinstance(conn.next_event(), EndOfMessage) and conn.reusable


def test_bytes_past_the_body_make_the_connection_unusable() -> None:
    conn = ClientConnection()
    conn.send_request(b"GET", b"/", [(b"Host", b"u")])
    conn.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
    assert isinstance(conn.next_event(), Response)
    conn.receive_data(b"okHTTP/1.1 200 OK\r\n")
    assert conn.next_event().data == b"ok"  # type: ignore[union-attr]
    assert isinstance(conn.next_event(), EndOfMessage)
    assert not conn.reusable


def test_interim_heads_come_first_then_the_final_one() -> None:
    conn = ClientConnection()
    conn.send_request(b"GET", b"/", [(b"Host", b"u")])
    conn.receive_data(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early\r\nLink: <a>\r\n\r\n"
                      b"HTTP/1.1 204 No Content\r\n\r\n")
    statuses = [conn.next_event().status for _ in range(3)]  # type: ignore[union-attr]
    assert statuses == [100, 103, 204]
    assert isinstance(conn.next_event(), EndOfMessage) and conn.reusable


def test_a_connection_carries_the_next_request_only_when_reusable() -> None:
    conn = ClientConnection()
    conn.send_request(b"GET", b"/", [(b"Host", b"u")])
    conn.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    read_all(conn)
    assert conn.send_request(b"GET", b"/2", [(b"Host", b"u")]).startswith(b"GET /2 ")
    conn.receive_data(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    read_all(conn)
    assert not conn.reusable
    with pytest.raises(LocalProtocolError):
        conn.send_request(b"GET", b"/3", [(b"Host", b"u")])


@pytest.mark.parametrize(("version", "connection", "reusable"), [
    (b"1.1", b"", True), (b"1.1", b"Connection: , close", False),
    (b"1.0", b"", False), (b"1.0", b"Connection: keep-alive,", True),
])
def test_keep_alive_follows_version_and_connection_tokens(
        version: bytes, connection: bytes, reusable: bool) -> None:
    conn = ClientConnection()
    conn.send_request(b"GET", b"/", [(b"Host", b"u")])
    extra = connection + b"\r\n" if connection else b""
    conn.receive_data(b"HTTP/" + version + b" 200 OK\r\n" + extra + b"Content-Length: 0\r\n\r\n")
    read_all(conn)
    assert conn.reusable is reusable


def test_request_body_framing_and_length_checks() -> None:
    conn = ClientConnection()
    conn.send_request(b"PUT", b"/", [(b"Host", b"u"), (b"Transfer-Encoding", b"chunked")])
    assert conn.expects_body
    assert conn.send_body(b"abc") == b"3\r\nabc\r\n"
    assert conn.send_body(b"") == b""
    assert conn.end_body() == b"0\r\n\r\n"
    conn = ClientConnection()
    conn.send_request(b"PUT", b"/", [(b"Host", b"u"), (b"Content-Length", b"4")])
    assert conn.send_body(b"ab") == b"ab"
    with pytest.raises(LocalProtocolError):
        conn.send_body(b"abc")
    conn = ClientConnection()
    conn.send_request(b"PUT", b"/", [(b"Host", b"u"), (b"Content-Length", b"4")])
    conn.send_body(b"ab")
    with pytest.raises(LocalProtocolError):
        conn.end_body()


def test_request_body_parts_carry_the_piece_uncopied() -> None:
    """The async driver writes send_body_parts' parts in one gathering write: the
    same bytes as send_body, the piece itself among them (not a framed copy)."""
    piece = bytes(range(256)) * 256
    conn = ClientConnection()
    conn.send_request(b"PUT", b"/", [(b"Host", b"u"), (b"Transfer-Encoding", b"chunked")])
    parts = conn.send_body_parts(piece)
    assert parts[1] is piece and b"".join(parts) == b"10000\r\n" + piece + b"\r\n"
    assert conn.send_body_parts(b"") == ()
    conn = ClientConnection()
    conn.send_request(b"PUT", b"/", [(b"Host", b"u"), (b"Content-Length", b"65538")])
    parts = conn.send_body_parts(piece)
    assert len(parts) == 1 and parts[0] is piece
    with pytest.raises(LocalProtocolError):
        conn.send_body_parts(b"abc")


def test_an_early_answer_stops_the_upload_and_forbids_reuse() -> None:
    conn = ClientConnection()
    conn.send_request(b"POST", b"/", [(b"Host", b"u"), (b"Transfer-Encoding", b"chunked")])
    assert conn.send_body(b"abc")
    conn.receive_data(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
    assert conn.send_body(b"more") == b"" and conn.upload_stopped
    assert conn.end_body() == b""  # no terminating chunk either
    head, _ = read_all(conn)
    assert head.status == 413 and not conn.reusable


def _reused(method: bytes, headers: list[tuple[bytes, bytes]]) -> ClientConnection:
    conn = ClientConnection()
    conn.send_request(b"GET", b"/", [(b"Host", b"u")])
    conn.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    read_all(conn)
    conn.send_request(method, b"/", [(b"Host", b"u"), *headers])
    return conn


def test_retry_rule() -> None:
    conn = _reused(b"GET", [])
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    assert conn.may_retry()  # idempotent, bodiless, no response byte, reused
    conn = _reused(b"GET", [])
    conn.receive_data(b"HTTP/1.1 2")
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    assert not conn.may_retry()  # a response byte came
    assert not _reused(b"POST", []).may_retry()
    assert not _reused(b"PUT", [(b"Content-Length", b"1")]).may_retry()
    fresh = ClientConnection()
    fresh.send_request(b"GET", b"/", [(b"Host", b"u")])
    assert not fresh.may_retry()
    fresh.write_failed(nothing_written=True)  # not one byte left: any request may go again
    assert fresh.may_retry()
    post = _reused(b"POST", [(b"Content-Length", b"1")])
    post.write_failed(nothing_written=True)
    assert not post.expects_body and post.may_retry()


# -- every variant through the proxy, on every pairing -------------------------------------


def raw_answer(rid: str, answer: bytes, method: str = "GET") -> bytes:
    return request_bytes(method, "/framing", [
        ("x-req-id", rid), ("x-upstream", "raw"),
        ("x-upstream-raw", base64.b64encode(answer).decode())])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_framing_variant_through_the_proxy(proxy: ProxyProcess, upstream: Upstream, rid: str,
                                           name: str) -> None:
    expected = VARIANTS[name][2]
    response = exchange(proxy.port, raw_answer(rid, raw_response(name)), timeout=15)
    assert response.complete, "the stream hung or was cut"
    if expected is None:
        assert response.status == 502
        assert response.header("content-type") == "application/problem+json"
    else:
        assert (response.status, response.body) == (200, expected)
        assert response.header("x-variant") == "1"
        assert response.header("transfer-encoding") in (None, "chunked")
    bad_conn = upstream.wait_record(rid).conn_id
    for i in range(2):
        after = exchange(proxy.port, request_bytes("GET", f"/after-{i}",
                                                   [("x-req-id", f"{rid}-{i}")]))
        assert after.status == 200 and json.loads(after.body)["target"] == f"/after-{i}"
        if expected is None:
            assert upstream.wait_record(f"{rid}-{i}").conn_id != bad_conn, (
                "a connection with refused framing went back to the pool")


_TE = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(("stream", "body"), [
    (_TE + b"00000000000000005\r\nhello\r\n0\r\n\r\n", HELLO),   # leading zeros do not count
    (_TE + b"5;a=b\r\nhello\r\n0\r\nX-T: 1\r\n\r\n", HELLO),     # extension, trailer
    (b"HTTP/1.1 103 Early\r\nContent-Length: 3\r\n\r\n" + raw_response("length"), HELLO),
    (_TE + b"5 ;a\r\nhello\r\n0\r\n\r\n", None),               # whitespace before ';'
    (_TE + b"5\r\nhello\r\n0\r\nbad line\r\n\r\n", None),       # trailer not a field
    (_TE + b"5\r\nhello\r\n0\r\nContent-Length: 5\r\n\r\n", None),  # framing trailer
    (_TE + b"5\r\nhello\r\n0\r\nTransfer-Encoding: identity\r\n\r\n", None),
    (_TE + b"5\r\nhello\r\n0\r\nTransfer-Encoding: Chunked\r\n\r\n", HELLO),
    (b"HTTP/1.1 150 Odd\r\nContent-Length: 3\r\n\r\nabc" + raw_response("length"), None),
    (b"HTTP/1.1 200 OK\nContent-Length: 0\n", None),         # bare LF: refused, not awaited
    (_TE + b"5\r\nhello\r\n0\r\n\n", None),                  # bare LF after the last chunk
    (b"HTTP/1.1 099 Low\r\nContent-Length: 0\r\n\r\n", None),
], ids=["zeros", "ext-trailer", "103-length-ignored", "bws-size", "bad-trailer",
        "length-trailer", "coding-trailer", "chunked-trailer", "150-with-body", "bare-lf",
        "bare-lf-trailers", "status-below-100"])
def test_codec_strictness_matches_the_references(stream: bytes, body: bytes | None) -> None:
    conn = ClientConnection()
    conn.send_request(b"GET", b"/", [(b"Host", b"u")])
    conn.receive_data(stream)
    events = []
    try:
        while (event := conn.next_event()) is not NEED_DATA and not isinstance(event, EndOfMessage):
            events.append(event)
    except RemoteProtocolError:
        assert body is None and not conn.reusable
        return
    assert body is not None, f"read a message both h11 and llhttp refuse: {events}"
    assert b"".join(e.data for e in events if isinstance(e, Data)) == body


@pytest.mark.parametrize(("trailer", "reusable"), [
    (b"X-Checksum: 1", True), (b"Connection: close, keep-alive", False),
    (b"Transfer-Encoding: chunked\t", False)])
def test_framing_trailers_forbid_reuse(trailer: bytes, reusable: bool) -> None:
    conn = ClientConnection()
    conn.send_request(b"GET", b"/", [(b"Host", b"u")])
    conn.receive_data(_TE + b"5\r\nhello\r\n0\r\n" + trailer + b"\r\n\r\n")
    head, body = read_all(conn)
    assert body == HELLO and conn.reusable is reusable  # llhttp may close after them
