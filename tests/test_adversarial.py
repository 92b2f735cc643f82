"""Hostile input at the trust boundary, for every face x server pairing.

Request smuggling and framing tricks, header abuse, a lying upstream, and an
upstream that drops a keep-alive connection under the proxy's feet. For each
attack the rule is the same: the front server or the proxy refuses it (4xx, or
a closed connection), or the upstream sees exactly one well-framed request with
exactly the body the client framed. Never a second, smuggled request; never
both framing headers; never a pooled upstream connection that carries the
leftovers of a previous answer; never a non-idempotent request sent twice.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from tests.conftest import MakeProxy, ProxyProcess, xfail_on_granian
from tests.rawhttp import RawResponse, Reader, connect, exchange, read_response, request_bytes
from tests.upstream import Upstream

# -- 1. smuggling and framing -----------------------------------------------------------------
#
# Every payload carries a marker request, `GET /smuggled-<rid>`, placed where a
# server that frames the body wrongly would take it for a request of its own.
# The attack is sent with a last, legitimate `Connection: close` request behind
# it, so a desynchronised connection shows up as extra requests upstream.

END = b"0\r\n\r\n"
HELLO = b"hello"
A5 = b"AAAAA"


@dataclass(frozen=True)
class Attack:
    lines: list[str]               # header lines after Host and x-req-id
    body: bytes                    # everything after the head
    # The bodies the upstream may receive if the request is accepted (each a reading
    # the RFC allows), mapped to whether the marker then legitimately follows as the
    # client's next request. Empty: the request must be refused.
    readings: dict[bytes, bool]
    must_accept: bool = False      # a valid request: refusing it is a bug too
    marker_follows: bool = False   # control case: the marker must reach the upstream
    version: str = "HTTP/1.1"


Build = Callable[[bytes], Attack]


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def length_of(body: bytes) -> str:
    return f"Content-Length: {len(body)}"


def te_and_cl(*te_lines: str) -> Build:
    """A Transfer-Encoding (plain or disguised) next to a Content-Length covering all:
    honouring the TE ends the body at once and leaves the marker as a next request,
    honouring the CL hides it in the body. Both at once must be refused."""
    return lambda m: Attack([*te_lines, length_of(END + m)], END + m, {})


def te_alone(*te_lines: str, readings: dict[bytes, bool] | None = None) -> Build:
    return lambda m: Attack(list(te_lines), chunk(HELLO) + END + m, readings or {})


def cl_alone(value: str, body: bytes = HELLO, readings: dict[bytes, bool] | None = None
             ) -> Build:
    return lambda m: Attack([f"Content-Length: {value}"], body + m, readings or {})


def chunked(payload: bytes, readings: dict[bytes, bool] | None = None) -> Build:
    return lambda m: Attack(["Transfer-Encoding: chunked"], payload + m, readings or {})


ATTACKS: dict[str, Build] = {
    # both framings (CL.TE and TE.CL)
    "cl-te": lambda m: Attack([length_of(END + m), "Transfer-Encoding: chunked"], END + m, {}),
    "te-cl": lambda m: Attack(["Transfer-Encoding: chunked", "Content-Length: 4"],
                              b"%02x\r\n%b\r\n" % (len(m), m) + END, {}),
    # disguised Transfer-Encoding next to a Content-Length
    "te-chunked-chunked+cl": te_and_cl("Transfer-Encoding: chunked, chunked"),
    "te-leading-space+cl": te_and_cl("Transfer-Encoding:    chunked"),
    "te-leading-tab+cl": te_and_cl("Transfer-Encoding:\tchunked"),
    "te-xchunked+cl": te_and_cl("Transfer-Encoding: xchunked"),
    "te-two-lines+cl": te_and_cl("Transfer-Encoding: gzip", "Transfer-Encoding: chunked"),
    "te-gzip-chunked+cl": te_and_cl("Transfer-Encoding: gzip, chunked"),
    "te-identity+cl": te_and_cl("Transfer-Encoding: identity"),
    "te-space-before-colon+cl": te_and_cl("Transfer-Encoding : chunked"),
    "te-folded-line+cl": te_and_cl("X-Pad: 1", " Transfer-Encoding: chunked"),
    "te-folded-value+cl": te_and_cl("Transfer-Encoding: x", "\tchunked"),
    "te-http10+cl": lambda m: Attack(["Transfer-Encoding: chunked", length_of(END + m)],
                                     END + m, {}, version="HTTP/1.0"),
    # disguised Transfer-Encoding alone
    "te-chunked-chunked": te_alone("Transfer-Encoding: chunked, chunked"),
    "te-leading-tab": te_alone("Transfer-Encoding:\tchunked", readings={HELLO: True}),
    "te-xchunked": te_alone("Transfer-Encoding: xchunked"),
    "te-two-lines": te_alone("Transfer-Encoding: gzip", "Transfer-Encoding: chunked"),
    "te-gzip-chunked": te_alone("Transfer-Encoding: gzip, chunked"),
    "te-chunked-gzip": te_alone("Transfer-Encoding: chunked, gzip"),
    "te-space-before-colon": te_alone("Transfer-Encoding : chunked"),
    # RFC 9112 6.1: TE on HTTP/1.0 is faulty framing; close after it whatever happens.
    "te-http10": lambda m: Attack(["Transfer-Encoding: chunked"], chunk(HELLO) + END + m,
                                  {HELLO: False}, version="HTTP/1.0"),
    # odd Content-Length values
    "cl-plus": cl_alone("+5"),
    "cl-minus-zero": cl_alone("-0", b""),
    "cl-negative": cl_alone("-5"),
    "cl-hex": cl_alone("0x10", b""),
    "cl-inner-space": cl_alone("5 5"),
    "cl-list-differing": cl_alone("1, 2"),
    "cl-huge": cl_alone("99999999999999999999999", b""),
    "cl-two-differing": lambda m: Attack(["Content-Length: 5", "Content-Length: 6"],
                                         HELLO + m, {}),
    # RFC 9110 8.6: equal repeated lengths may be merged or refused
    "cl-list-equal": cl_alone("5, 5", readings={HELLO: True}),
    "cl-two-equal": lambda m: Attack(["Content-Length: 5", "Content-Length: 5"],
                                     HELLO + m, {HELLO: True}),
    "cl-leading-zeros": cl_alone("005", readings={HELLO: True}),
    # chunk-size tricks
    "chunk-size-0x": chunked(b"0x5\r\nAAAAA\r\n" + END),
    "chunk-size-plus": chunked(b"+5\r\nAAAAA\r\n" + END),
    "chunk-size-negative": chunked(b"-5\r\nAAAAA\r\n" + END),
    "chunk-size-underscore": chunked(b"0_5\r\nAAAAA\r\n" + END),
    "chunk-size-huge": chunked(b"fffffffffffffffffff\r\nAAAA\r\n" + END),
    "chunk-size-wraps-64-bits": chunked(b"10000000000000005\r\nAAAAA\r\n" + END),
    "chunk-size-leading-zeros": chunked(b"005\r\nAAAAA\r\n" + END, {A5: True}),
    "chunk-ext": chunked(b"5;name=value\r\nAAAAA\r\n" + END, {A5: True}),
    "chunk-ext-bws": chunked(b"5 ;ext\r\nAAAAA\r\n" + END, {A5: True}),
    "chunk-ext-quoted": chunked(b'5;a="x;y"\r\nAAAAA\r\n' + END, {A5: True}),
    "chunk-ext-open-quote": chunked(b'5;a="\r\n0\r\n\r\n"\r\nAAAAA\r\n' + END),
    "chunk-data-longer-than-size": chunked(b"3\r\nAAAAA\r\n" + END),
    "chunk-missing-crlf-after-data": chunked(b"5\r\nAAAAA0\r\n\r\n"),
    # a lenient parser swallows the marker as trailer lines; a strict one refuses
    "chunk-missing-final-crlf": chunked(b"5\r\nAAAAA\r\n0\r\n", {A5: False}),
    "chunk-trailer": chunked(b"5\r\nAAAAA\r\n0\r\nX-T: 1\r\n\r\n", {A5: True}),
    # line endings: a bare LF may be taken as one (RFC 9112 2.2), a bare CR never
    "chunk-bare-lf": chunked(b"5\nAAAAA\n0\n\n", {A5: True}),
    "chunk-bare-lf-after-data": chunked(b"5\r\nAAAAA\n" + END, {A5: True}),
    "chunk-bare-cr": chunked(b"5\rAAAAA\r\n" + END),
    "chunk-bare-cr-after-data": chunked(b"5\r\nAAAAA\r0\r\n\r\n"),
    # a request inside a body is just body bytes
    "embedded-in-length-body": lambda m: Attack([length_of(HELLO + m)], HELLO + m,
                                                {HELLO + m: False}, must_accept=True),
    "embedded-in-chunk": lambda m: Attack(["Transfer-Encoding: chunked"],
                                          chunk(HELLO + m) + END, {HELLO + m: False},
                                          must_accept=True),
    # control: a pipelined marker after a clean body is the client's own request
    "control-pipelined": lambda m: Attack([length_of(HELLO)], HELLO + m, {HELLO: True},
                                          must_accept=True, marker_follows=True),
}


def marker(rid: str) -> bytes:
    return (f"GET /smuggled-{rid} HTTP/1.1\r\nHost: proxy.test\r\n"
            f"x-req-id: {rid}-smuggled\r\n\r\n").encode()


def tracebacks(proxy: ProxyProcess) -> int:
    """Tracebacks in the proxy's log so far: a hostile peer must never cause one."""
    return proxy.log().count("Traceback")


def refused(status: int) -> bool:
    # gunicorn answers 501 to a transfer coding it does not implement (RFC 9112 6.1)
    return 400 <= status < 500 or status == 501


def send_and_read(port: int, raw: bytes, rid: str, timeout: float = 2.0) -> list[RawResponse]:
    """Send the attack and a closing request in one go; read every response until the
    server closes (or goes quiet: a server waiting for body bytes that never come)."""
    closing = (f"GET /end-{rid} HTTP/1.1\r\nHost: proxy.test\r\nx-req-id: {rid}-end\r\n"
               "Connection: close\r\n\r\n").encode()
    responses: list[RawResponse] = []
    with connect(port, timeout=timeout) as sock:
        try:
            sock.sendall(raw + closing)
        except OSError:
            return responses  # refused by closing while we were still sending
        reader = Reader(sock)
        while True:
            try:
                responses.append(read_response(reader, "POST"))
            except (OSError, ValueError):  # closed, reset, timed out, or not HTTP
                return responses


def check_one_well_framed_request(upstream: Upstream, rid: str, attack: Attack,
                                  responses: list[RawResponse]) -> None:
    records = upstream.find_all(rid)
    assert len(records) <= 1, "one request reached the upstream as several"
    statuses = [r.status for r in responses]
    marker_ok = False
    accepted = False
    if records:
        record = upstream.wait_record(rid, complete=True)  # its body ended or was aborted
        assert record.error is None, f"the upstream could not parse it: {record.error}"
        assert record.framing in ("content-length", "chunked"), record.framing
        if record.complete:
            accepted = True
            assert record.body in attack.readings, (
                f"the upstream got a body the client did not frame: {record.body!r}")
            assert statuses[:1] == [200], statuses
            marker_ok = attack.readings[record.body]
    if not accepted:
        assert not attack.must_accept, f"a valid request was refused: {statuses}"
        assert all(refused(s) for s in statuses[:1]), statuses
    smuggled = [r for r in upstream.records
                if r.req_id == f"{rid}-smuggled" or r.target == f"/smuggled-{rid}".encode()]
    if attack.marker_follows:
        assert len(smuggled) == 1, "control: the pipelined request never arrived"
    elif not marker_ok:
        assert not smuggled, f"a smuggled request reached the upstream (statuses {statuses})"
    assert len(smuggled) <= 1


@pytest.mark.parametrize("name", list(ATTACKS))
def test_smuggling_and_framing_tricks(proxy: ProxyProcess, upstream: Upstream, rid: str,
                                      name: str, request: pytest.FixtureRequest) -> None:
    xfail_on_granian(request, "both-framings", when=name in (
        "cl-te", "te-cl", "te-leading-space+cl", "te-leading-tab+cl"))
    attack = ATTACKS[name](marker(rid))
    head = "\r\n".join([f"POST /attack {attack.version}", "Host: proxy.test",
                        f"x-req-id: {rid}", *attack.lines]).encode() + b"\r\n\r\n"
    crashes = tracebacks(proxy)
    responses = send_and_read(proxy.port, head + attack.body, rid)
    check_one_well_framed_request(upstream, rid, attack, responses)
    assert proxy.alive() and tracebacks(proxy) == crashes


# -- 2. an upstream that lies about framing ---------------------------------------------------

POISON = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nX-Poison: yes\r\n\r\npoison!"
OK = b"HTTP/1.1 200 OK\r\n"


@dataclass(frozen=True)
class BadAnswer:
    raw: bytes
    # The one correct relay when relaying is acceptable (status, body); None: the
    # client must get a 502 or an aborted connection. Either way never the poison.
    exact: tuple[int, bytes] | None = None
    method: str = "GET"


BAD_ANSWERS: dict[str, BadAnswer] = {
    "both-framings": BadAnswer(OK + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                               + chunk(HELLO) + END + POISON),
    "both-framings-te-first": BadAnswer(
        OK + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n" + chunk(HELLO) + END
        + POISON),
    "two-differing-lengths": BadAnswer(OK + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\n"
                                       + b"hello!" + POISON),
    "differing-length-list": BadAnswer(OK + b"Content-Length: 5, 6\r\n\r\nhello!" + POISON),
    "length-not-a-number": BadAnswer(OK + b"Content-Length: abc\r\n\r\nhello" + POISON),
    "length-plus": BadAnswer(OK + b"Content-Length: +5\r\n\r\nhello" + POISON),
    "length-negative": BadAnswer(OK + b"Content-Length: -5\r\n\r\nhello" + POISON),
    "length-hex": BadAnswer(OK + b"Content-Length: 0x5\r\n\r\nhello" + POISON),
    "two-equal-lengths": BadAnswer(OK + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello"
                                   + POISON, exact=(200, HELLO)),
    "equal-length-list": BadAnswer(OK + b"Content-Length: 5, 5\r\n\r\nhello" + POISON,
                                   exact=(200, HELLO)),
    "extra-after-length": BadAnswer(OK + b"Content-Length: 5\r\n\r\nhello" + POISON,
                                    exact=(200, HELLO)),
    "extra-after-chunked": BadAnswer(OK + b"Transfer-Encoding: chunked\r\n\r\n" + chunk(HELLO)
                                     + END + POISON, exact=(200, HELLO)),
    "extra-after-204": BadAnswer(b"HTTP/1.1 204 No Content\r\n\r\n" + POISON, exact=(204, b"")),
    "body-on-304": BadAnswer(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\nhello"
                             + POISON, exact=(304, b"")),
    "body-on-head": BadAnswer(OK + b"Content-Length: 5\r\n\r\nhello" + POISON,
                              exact=(200, b""), method="HEAD"),
    "http10-answer": BadAnswer(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello" + POISON,
                               exact=(200, HELLO)),
    "bad-chunk-size": BadAnswer(OK + b"Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n"
                                + END + POISON),
    "gzip-transfer-coding": BadAnswer(OK + b"Transfer-Encoding: gzip, chunked\r\n\r\n"
                                      + chunk(HELLO) + END + POISON),
    "bare-lf-head": BadAnswer(b"HTTP/1.1 200 OK\nContent-Length: 5\n\nhello" + POISON),
    "cr-in-header": BadAnswer(OK + b"X-A: 1\rSet-Cookie: evil=1\r\nContent-Length: 5\r\n\r\n"
                              b"hello" + POISON),
    "nul-in-header": BadAnswer(OK + b"X-A: 1\x00\r\nContent-Length: 5\r\n\r\nhello" + POISON),
    "folded-header": BadAnswer(OK + b"X-A: 1\r\n Set-Cookie: evil=1\r\nContent-Length: 5\r\n\r\n"
                               b"hello" + POISON),
    "space-before-colon": BadAnswer(OK + b"Content-Length : 5\r\n\r\nhello" + POISON),
    "bad-status-line": BadAnswer(b"HTTP/1.1 2000 OK\r\nContent-Length: 5\r\n\r\nhello" + POISON),
    # the proxy never asks for an upgrade: a 101 is a broken upstream, not a relay
    "unsolicited-101": BadAnswer(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n"
                                 b"Connection: Upgrade\r\n\r\n" + POISON),
}


def raw_answer_request(method: str, rid: str, answer: bytes) -> bytes:
    return request_bytes(method, "/poison", [
        ("x-req-id", rid), ("x-upstream", "raw"),
        ("x-upstream-raw", base64.b64encode(answer).decode())])


def outcome(port: int, method: str, rid: str, answer: bytes) -> tuple[str, RawResponse | None]:
    """"502", "abort" (closed before or inside the body) or "relayed" (with the response)."""
    try:
        response = exchange(port, raw_answer_request(method, rid, answer), timeout=15)
    except (ConnectionError, ValueError):
        return "abort", None
    if not response.complete:
        return "abort", response
    if response.status == 502:
        assert response.header("content-type") == "application/problem+json"
        return "502", response
    return "relayed", response


def assert_clean(response: RawResponse) -> None:
    assert b"poison" not in response.body
    assert response.header("x-poison") is None
    assert all("evil" not in v for v in response.header_all("set-cookie"))


def assert_fresh_connections_after(port: int, upstream: Upstream, rid: str,
                                   bad_conn: int) -> None:
    for i in range(3):
        after = exchange(port, request_bytes("GET", f"/after-{i}", [("x-req-id", f"{rid}-{i}")]))
        assert after.status == 200 and after.complete
        assert_clean(after)
        assert json.loads(after.body)["target"] == f"/after-{i}"
        assert upstream.wait_record(f"{rid}-{i}").conn_id != bad_conn, (
            "the poisoned upstream connection went back to the pool")


@pytest.mark.parametrize("name", list(BAD_ANSWERS))
def test_lying_upstream_answers_never_poison_the_pool(proxy: ProxyProcess, upstream: Upstream,
                                                      rid: str, name: str) -> None:
    bad = BAD_ANSWERS[name]
    crashes = tracebacks(proxy)
    kind, response = outcome(proxy.port, bad.method, rid, bad.raw)
    if response is not None:
        assert_clean(response)
    if kind == "relayed":
        assert response is not None and bad.exact is not None, (
            f"relayed a broken answer: {response and (response.status, response.body)}")
        assert (response.status, response.body) == bad.exact
    bad_conn = upstream.wait_record(rid).conn_id
    assert_fresh_connections_after(proxy.port, upstream, rid, bad_conn)
    assert tracebacks(proxy) == crashes, proxy.log()[-3000:]


@pytest.mark.parametrize("interim", [
    b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n"
    b"HTTP/1.1 103 Early Hints\r\nLink: </a.js>; rel=preload\r\n\r\n",
    b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" * 200,
], ids=["103", "100-102-103", "200x103"])
def test_interim_answers_before_the_final_one(proxy: ProxyProcess, upstream: Upstream, rid: str,
                                             interim: bytes) -> None:
    answer = interim + OK + b"Content-Length: 5\r\nX-Final: 1\r\n\r\nhello"
    response = exchange(proxy.port, raw_answer_request("GET", rid, answer), timeout=15)
    assert (response.status, response.body, response.complete) == (200, HELLO, True)
    assert response.header("x-final") == "1"
    assert set(response.interim) <= {100, 102, 103}
    upstream.wait_record(rid)
    after = exchange(proxy.port, request_bytes("GET", "/after", [("x-req-id", rid + "-a")]))
    assert after.status == 200 and json.loads(after.body)["target"] == "/after"


# -- 3. header abuse ------------------------------------------------------------------------


SPOOFED = [("Authorization", "Bearer t"), ("X-Forwarded-For", "6.6.6.6"),
           ("X-Forwarded-Host", "evil.test"), ("X-Forwarded-Proto", "https"),
           ("Forwarded", "for=6.6.6.6;host=evil.test;proto=https")]


@pytest.mark.parametrize("named", [
    "X-Forwarded-For", "Authorization", "Host", "X-Forwarded-Host", "X-Forwarded-Proto",
    "Forwarded", "X-Forwarded-For, Forwarded, Host",
])
def test_connection_cannot_strip_what_the_proxy_sets(proxy: ProxyProcess, upstream: Upstream,
                                                     rid: str, named: str) -> None:
    raw = request_bytes("GET", "/conn", [("x-req-id", rid), ("Connection", named), *SPOOFED])
    response = exchange(proxy.port, raw)
    assert response.status == 200
    record = upstream.wait_record(rid)
    assert record.header_all("host") == [upstream.url.removeprefix("http://")]
    assert record.header_all("x-forwarded-for") == ["127.0.0.1"]
    assert record.header_all("x-forwarded-host") == ["proxy.test"]
    assert record.header_all("x-forwarded-proto") == ["http"]
    forwarded = record.header_all("forwarded")
    assert len(forwarded) == 1 and "for=127.0.0.1" in forwarded[0]
    assert "6.6.6.6" not in forwarded[0] and "evil" not in forwarded[0]
    # Authorization is end-to-end unless the client itself names it hop-by-hop.
    expected_auth = [] if named == "Authorization" else ["Bearer t"]
    assert record.header_all("authorization") == expected_auth


@pytest.mark.parametrize("chunked_body", [False, True], ids=["length", "chunked"])
def test_connection_cannot_strip_the_framing(proxy: ProxyProcess, upstream: Upstream, rid: str,
                                             chunked_body: bool) -> None:
    body = b"framed body " * 100
    headers = [("x-req-id", rid), ("Connection", "Content-Length, Transfer-Encoding")]
    if chunked_body:
        raw = request_bytes("POST", "/conn", [*headers, ("Transfer-Encoding", "chunked")],
                            chunk(body[:500]) + chunk(body[500:]) + END)
    else:
        raw = request_bytes("POST", "/conn", headers, body)
    assert exchange(proxy.port, raw).status == 200
    record = upstream.wait_record(rid, complete=True)
    assert record.complete and record.body == body
    assert record.framing == ("chunked" if chunked_body else "content-length")


def test_several_connection_lines_one_empty(proxy: ProxyProcess, upstream: Upstream,
                                            rid: str) -> None:
    raw = request_bytes("GET", "/conn", [("x-req-id", rid), ("Connection", ""),
                                         ("Connection", "X-A"), ("X-A", "1"), ("X-B", "2"),
                                         ("Connection", " , x-c ,"), ("X-C", "3")])
    assert exchange(proxy.port, raw).status == 200
    record = upstream.wait_record(rid)
    names = record.header_names()
    assert "x-a" not in names and "x-c" not in names and "connection" not in names
    assert record.header_all("x-b") == ["2"]


def test_h2c_upgrade_is_never_forwarded(proxy: ProxyProcess, upstream: Upstream,
                                        rid: str) -> None:
    raw = request_bytes("GET", "/up", [("x-req-id", rid), ("Connection", "Upgrade, HTTP2-Settings"),
                                       ("Upgrade", "h2c"), ("HTTP2-Settings", "AAMAAABkAAQAAP__")])
    response = exchange(proxy.port, raw)
    assert response.status == 200 and 101 not in response.interim
    assert response.header("upgrade") is None
    names = upstream.wait_record(rid).header_names()
    assert not {"upgrade", "http2-settings", "connection"} & set(names)


def head_with(rid: str, *lines: bytes, request_line: bytes = b"GET /h HTTP/1.1") -> bytes:
    return b"\r\n".join([request_line, b"Host: proxy.test", b"x-req-id: " + rid.encode(),
                         *lines]) + b"\r\n\r\n"


# Each builds raw request bytes from the rid; all must be refused with a 400.
INJECTIONS: dict[str, Callable[[str], bytes]] = {
    "nul-in-value": lambda rid: head_with(rid, b"X-A: a\x00b"),
    "cr-in-value": lambda rid: head_with(rid, b"X-A: a\rX-Injected: 1"),
    "lf-in-value": lambda rid: head_with(rid, b"X-A: a\nX-Injected: 1"),
    "del-in-value": lambda rid: head_with(rid, b"X-A: a\x7fb"),
    "ctl-in-value": lambda rid: head_with(rid, b"X-A: a\x01b"),
    "folded-value": lambda rid: head_with(rid, b"X-A: a", b" X-Injected: 1"),
    "space-in-name": lambda rid: head_with(rid, b"X Injected: 1"),
    "nul-in-name": lambda rid: head_with(rid, b"X-Injected\x00: 1"),
    "line-without-colon": lambda rid: head_with(rid, b"X-Injected"),
    "nul-in-target": lambda rid: head_with(rid, request_line=b"GET /h\x00x HTTP/1.1"),
    "cr-in-target": lambda rid: head_with(rid, request_line=b"GET /h\rX-Injected: 1 HTTP/1.1"),
    "lf-in-target": lambda rid: head_with(rid, request_line=b"GET /h\nX-Injected: 1 HTTP/1.1"),
    "space-in-target": lambda rid: head_with(rid, request_line=b"GET /h X-Injected: HTTP/1.1"),
    "tab-in-target": lambda rid: head_with(rid, request_line=b"GET /h\tx HTTP/1.1"),
    "del-in-target": lambda rid: head_with(rid, request_line=b"GET /h\x7fx HTTP/1.1"),
    "encoded-nul-in-target": lambda rid: head_with(rid, request_line=b"GET /h%00x HTTP/1.1"),
    "bare-cr-line-ending": lambda rid: head_with(rid, b"X-A: 1\rX-Injected: 1"),
    "http09-request-line": lambda rid: b"GET /h\r\nx-req-id: " + rid.encode() + b"\r\n\r\n",
    "two-hosts": lambda rid: head_with(rid, b"Host: evil.test"),
    "host-with-space": lambda rid: b"GET /h HTTP/1.1\r\nHost: a b\r\nx-req-id: "
    + rid.encode() + b"\r\n\r\n",
    "http2-preface": lambda rid: b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
}


@pytest.mark.parametrize("name", list(INJECTIONS))
def test_crlf_and_nul_injection_is_refused(proxy: ProxyProcess, upstream: Upstream, rid: str,
                                           name: str, request: pytest.FixtureRequest) -> None:
    xfail_on_granian(request, "bare-lf", when=name == "lf-in-value")
    seen = len(upstream.records)
    crashes = tracebacks(proxy)
    try:
        response = exchange(proxy.port, INJECTIONS[name](rid), method="GET", timeout=10)
    except ConnectionError:
        pass  # refused by closing
    else:
        assert response.status == 400, (response.status, response.body[:200])
    assert upstream.find(rid) is None
    assert not [r for r in upstream.records[seen:] if r.header("x-injected") is not None]
    healthy = exchange(proxy.port, request_bytes("GET", "/fine", [("x-req-id", rid + "-ok")]))
    assert healthy.status == 200
    assert tracebacks(proxy) == crashes


@pytest.mark.parametrize(("raw_target", "value"), [
    (b"/h%0d%0aX-Injected:%201", b"v"),
    (b"/h?q=%0d%0a%00", b"v"),
    (b"/h", "caf\u00e9 \u00fcber".encode()),
    (b"/h", b"\x80\xff obs-text"),
], ids=["encoded-crlf-target", "encoded-ctl-query", "utf8-value", "obs-text-value"])
def test_encoded_and_obs_text_bytes_pass_verbatim(proxy: ProxyProcess, upstream: Upstream,
                                                  rid: str, raw_target: bytes,
                                                  value: bytes) -> None:
    raw = b"GET " + raw_target + b" HTTP/1.1\r\nHost: proxy.test\r\nx-req-id: " + rid.encode() \
        + b"\r\nX-Value: " + value + b"\r\n\r\n"
    response = exchange(proxy.port, raw, method="GET")
    if response.status == 400:
        assert upstream.find(rid) is None  # refusing is allowed; injecting never is
        return
    assert response.status == 200
    record = upstream.wait_record(rid)
    assert record.error is None and record.target == raw_target
    assert [v for k, v in record.headers if k.lower() == b"x-value"] == [value]
    assert "x-injected" not in record.header_names()


@pytest.mark.parametrize(("count", "size"), [(200, 10), (10000, 1), (1, 64 * 1024),
                                             (1, 256 * 1024)],
                         ids=["200-headers", "10000-headers", "64KB-header", "256KB-header"])
def test_oversized_heads_are_refused_and_the_proxy_stays_healthy(
        proxy: ProxyProcess, upstream: Upstream, rid: str, count: int, size: int) -> None:
    headers = [("x-req-id", rid)] + [(f"X-H{i}", "v" * size) for i in range(count)]
    raw = request_bytes("GET", "/big", headers)
    try:
        response = exchange(proxy.port, raw, timeout=15)
    except ConnectionError:
        assert len(raw) > 64 * 1024  # only a truly huge head may be cut off unanswered
    else:
        if count == 200:
            assert response.status == 431  # the core's own limit, the same on every server
        else:
            assert response.status in (400, 431), response.status
    assert upstream.find(rid) is None
    for i in range(3):
        ok = exchange(proxy.port, request_bytes("GET", "/fine", [("x-req-id", f"{rid}-ok{i}")]))
        assert ok.status == 200
        upstream.wait_record(f"{rid}-ok{i}")
    assert proxy.alive()


# -- 4. keep-alive races -------------------------------------------------------------------------


class ClosingUpstream:
    """An upstream that, once armed, closes the connection it answers next as soon as
    the following request arrives on it, unanswered: an upstream whose keep-alive
    timeout fires just as the proxy reuses the connection. Records every request
    head it reads as (connection number, x-req-id)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.seen: list[tuple[int, str]] = []
        self.armed = False
        self.lock = threading.Lock()
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self) -> None:
        with self.lock:
            self.armed = True

    def requests(self, rid: str) -> list[int]:
        with self.lock:
            return [n for n, r in self.seen if r == rid]

    def _accept(self) -> None:
        number = 0
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            number += 1
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn, number), daemon=True).start()

    def _serve(self, conn: socket.socket, number: int) -> None:
        with conn:
            try:
                self._requests(conn, number)
            except OSError:
                pass  # the proxy went away: this connection is done

    def _requests(self, conn: socket.socket, number: int) -> None:
        buf = b""
        doomed = False
        while True:
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            fields = {k.strip().lower(): v.strip() for k, _, v in
                      (line.partition(b":") for line in head.split(b"\r\n")[1:])}
            with self.lock:
                self.seen.append((number, fields.get(b"x-req-id", b"").decode()))
                if doomed:
                    return  # close without an answer (the body, if any, stays unread)
                doomed, self.armed = self.armed, False
            length = int(fields.get(b"content-length", b"0"))
            while len(buf) < length:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            buf = buf[length:]
            body = b"answered on connection %d" % number
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b"
                         % (len(body), body))

    def close(self) -> None:
        self.listener.close()
        for conn in self.conns:
            try:
                conn.close()
            except OSError:
                pass


@pytest.fixture(scope="module")
def closing_upstream() -> Iterator[ClosingUpstream]:
    server = ClosingUpstream()
    yield server
    server.close()


def test_get_on_a_connection_the_upstream_just_closed_is_retried(
        make_proxy: MakeProxy, closing_upstream: ClosingUpstream, rid: str) -> None:
    proxy = make_proxy(upstream_url=closing_upstream.url)
    for i in range(3):
        closing_upstream.arm()
        first = exchange(proxy.port, request_bytes("GET", "/first", [("x-req-id", f"{rid}-{i}a")]))
        assert first.status == 200
        second = exchange(proxy.port, request_bytes("GET", "/second",
                                                    [("x-req-id", f"{rid}-{i}b")]))
        assert second.status == 200 and second.complete
        tries = closing_upstream.requests(f"{rid}-{i}b")
        # Sent once on the connection that died, then once more on a fresh one.
        assert len(tries) == 2 and tries[0] == closing_upstream.requests(f"{rid}-{i}a")[0]
        assert second.body == b"answered on connection %d" % tries[1]


@pytest.mark.parametrize(("method", "body"), [("POST", b"x" * 1000), ("POST", None),
                                              ("PATCH", b"p" * 100), ("PUT", b"u" * 100)])
def test_non_idempotent_or_sent_body_is_never_resent(
        make_proxy: MakeProxy, closing_upstream: ClosingUpstream, rid: str, method: str,
        body: bytes | None) -> None:
    proxy = make_proxy(upstream_url=closing_upstream.url)
    closing_upstream.arm()
    first = exchange(proxy.port, request_bytes("GET", "/first", [("x-req-id", rid + "-a")]))
    assert first.status == 200
    response = exchange(proxy.port, request_bytes(method, "/again", [("x-req-id", rid)], body))
    assert response.status == 502
    assert response.header("content-type") == "application/problem+json"
    assert closing_upstream.requests(rid) == closing_upstream.requests(rid + "-a")[:1]
    after = exchange(proxy.port, request_bytes("GET", "/after", [("x-req-id", rid + "-c")]))
    assert after.status == 200


def test_upstream_closing_after_a_response_without_saying_so(
        proxy: ProxyProcess, upstream: Upstream, rid: str) -> None:
    closes = base64.b64encode(OK + b"Content-Length: 5\r\n\r\nhello").decode()
    with connect(proxy.port, timeout=15) as sock:
        reader = Reader(sock)
        for i in range(5):
            # The upstream closes right after this answer without `Connection: close`,
            # so the proxy may have pooled the connection as it dies.
            sock.sendall(request_bytes("GET", "/closes", [
                ("x-req-id", f"{rid}-{i}c"), ("x-upstream", "raw close=1"),
                ("x-upstream-raw", closes)]))
            assert read_response(reader).body == HELLO
            sock.sendall(request_bytes("GET", "/next", [("x-req-id", f"{rid}-{i}g")]))
            got = read_response(reader)
            assert got.status == 200 and json.loads(got.body)["target"] == "/next"
            assert len(upstream.find_all(f"{rid}-{i}g")) == 1
            sock.sendall(request_bytes("GET", "/closes", [
                ("x-req-id", f"{rid}-{i}d"), ("x-upstream", "raw close=1"),
                ("x-upstream-raw", closes)]))
            assert read_response(reader).body == HELLO
            sock.sendall(request_bytes("POST", "/post", [("x-req-id", f"{rid}-{i}p")],
                                       b"once" * 100))
            posted = read_response(reader)
            records = upstream.find_all(f"{rid}-{i}p")
            assert len(records) <= 1, "a POST reached the upstream twice"
            if posted.status == 200:
                assert records and records[0].body == b"once" * 100
            else:
                assert posted.status == 502


@pytest.mark.parametrize(("method", "body"), [("POST", b"r" * 4000), ("POST", None),
                                              ("GET", None)])
def test_request_reset_on_a_reused_connection(proxy: ProxyProcess, upstream: Upstream, rid: str,
                                              method: str, body: bytes | None) -> None:
    warm = exchange(proxy.port, request_bytes("GET", "/warm", [("x-req-id", rid + "-w")]))
    assert warm.status == 200  # the pool now holds a live connection for the next request
    response = exchange(proxy.port, request_bytes(
        method, "/reset", [("x-req-id", rid), ("x-upstream", "reset")], body))
    assert response.status == 502
    sent = len(upstream.find_all(rid))
    # An idempotent request may be retried once; a POST never.
    assert sent == 1 if method == "POST" else 1 <= sent <= 2
