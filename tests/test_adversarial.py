"""Hostile input at the trust boundary, for every face x server pairing.

Request smuggling and framing tricks, header abuse, and a poisoned upstream.
For each attack the rule is the same: the front server or the proxy refuses it
(4xx or a closed connection), or the upstream sees exactly one well-framed
request. Never a second, smuggled request; never both framing headers; never
a pooled connection that carries a previous response's leftovers.
"""

from __future__ import annotations

import base64
import json
import time

import pytest

from tests.conftest import ProxyProcess
from tests.rawhttp import Reader, connect, exchange, read_response, request_bytes
from tests.upstream import Upstream

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\nx-req-id: SMUGGLED\r\n\r\n"


def attack(proxy: ProxyProcess, raw: bytes) -> list[int]:
    """Send raw bytes, read every response the connection yields, return their statuses."""
    statuses: list[int] = []
    # A closing request after the attack ends the exchange without a half-close
    # (uvicorn treats a half-close as the client leaving).
    closing = b"GET /end HTTP/1.1\r\nHost: proxy.test\r\nConnection: close\r\n\r\n"
    with connect(proxy.port, timeout=3) as sock:
        try:
            sock.sendall(raw + closing)
        except OSError:
            return statuses
        reader = Reader(sock)
        while True:
            try:
                statuses.append(read_response(reader, "POST").status)
            except (ConnectionError, OSError, ValueError, TimeoutError):
                break
    return statuses


def assert_nothing_smuggled(upstream: Upstream, rid: str) -> None:
    time.sleep(0.3)
    for record in upstream.records:
        assert record.target != b"/smuggled", "a smuggled request reached the upstream"
        if record.req_id == rid:
            assert record.framing != "both"
            assert record.error is None, record.error
            assert record.header("x-req-id") != "SMUGGLED"


def head(rid: str, *lines: str) -> bytes:
    text = "\r\n".join(["POST /target HTTP/1.1", "Host: proxy.test", f"x-req-id: {rid}", *lines])
    return text.encode("latin-1") + b"\r\n\r\n"


def chunk_body(body: bytes) -> bytes:
    return b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body)


BODY = b"A" * 10 + SMUGGLED

# Each case: the framing lines and the body bytes that follow the head.
ATTACKS: dict[str, tuple[list[str], bytes]] = {
    "cl-and-te": (["Content-Length: 4", "Transfer-Encoding: chunked"], chunk_body(BODY)),
    "te-and-cl": (["Transfer-Encoding: chunked", "Content-Length: 4"], chunk_body(BODY)),
    "te-chunked-chunked": (["Transfer-Encoding: chunked, chunked"], chunk_body(BODY)),
    "te-leading-space": (["Transfer-Encoding:  chunked", "Content-Length: 4"], chunk_body(BODY)),
    "te-tab": (["Transfer-Encoding:\tchunked", "Content-Length: 4"], chunk_body(BODY)),
    "te-xchunked": (["Transfer-Encoding: xchunked", "Content-Length: 4"], chunk_body(BODY)),
    "te-two-lines": (["Transfer-Encoding: gzip", "Transfer-Encoding: chunked"],
                     chunk_body(BODY)),
    "te-gzip-chunked": (["Transfer-Encoding: gzip, chunked"], chunk_body(BODY)),
    "te-space-before-colon": (["Transfer-Encoding : chunked", "Content-Length: 4"],
                              chunk_body(BODY)),
    "cl-plus": (["Content-Length: +4"], BODY),
    "cl-minus-zero": (["Content-Length: -0"], BODY),
    "cl-hex": (["Content-Length: 0x4"], BODY),
    "cl-list": (["Content-Length: 4, 40"], BODY),
    "cl-two-differing": (["Content-Length: 4", "Content-Length: 40"], BODY),
    "chunk-size-hex-prefix": (["Transfer-Encoding: chunked"],
                              b"0x5\r\nAAAAA\r\n0\r\n\r\n" + SMUGGLED),
    "chunk-size-negative": (["Transfer-Encoding: chunked"], b"-5\r\nAAAAA\r\n0\r\n\r\n" + SMUGGLED),
    "chunk-size-huge": (["Transfer-Encoding: chunked"],
                        b"fffffffffffffffffff\r\nAAAA\r\n0\r\n\r\n" + SMUGGLED),
    "chunk-ext-quotes": (["Transfer-Encoding: chunked"],
                         b'5;a="\r\n0\r\n\r\n"\r\nAAAAA\r\n0\r\n\r\n' + SMUGGLED),
    "chunk-bare-lf": (["Transfer-Encoding: chunked"], b"5\nAAAAA\n0\n\n" + SMUGGLED),
    "chunk-missing-crlf": (["Transfer-Encoding: chunked"], b"5\r\nAAAAA0\r\n\r\n" + SMUGGLED),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_smuggling_attempts_never_reach_the_upstream_as_two_requests(
        proxy: ProxyProcess, upstream: Upstream, rid: str, name: str) -> None:
    lines, body = ATTACKS[name]
    statuses = attack(proxy, head(rid, *lines) + body)
    # Refusals are 4xx (gunicorn answers 501 to a coding it does not implement).
    assert all(s < 500 or s in (501, 502) for s in statuses), statuses
    assert_nothing_smuggled(upstream, rid)
    record = upstream.find(rid)
    if record is not None and record.complete:
        # Accepted as one request: its body is exactly what one framing says.
        assert record.framing in ("content-length", "chunked")
    assert proxy.alive()


def test_body_with_an_embedded_request_is_just_a_body(proxy: ProxyProcess, upstream: Upstream,
                                                      rid: str) -> None:
    statuses = attack(proxy, head(rid, f"Content-Length: {len(BODY)}") + BODY)
    assert statuses[:1] == [200]
    record = upstream.wait_record(rid)
    assert record.body == BODY and record.framing == "content-length"
    assert_nothing_smuggled(upstream, rid)


def test_bare_lf_and_bare_cr_in_the_head(proxy: ProxyProcess, upstream: Upstream,
                                         rid: str) -> None:
    for raw in (f"GET /lf HTTP/1.1\nHost: x\nx-req-id: {rid}\n\n".encode(),
                f"GET /cr HTTP/1.1\r\nHost: x\rx-injected: 1\r\nx-req-id: {rid}\r\n\r\n".encode()):
        statuses = attack(proxy, raw)
        assert all(s in (200, 400) for s in statuses), statuses
    time.sleep(0.3)
    for record in upstream.find_all(rid):
        assert record.header("x-injected") is None
        assert all(b"\r" not in v and b"\n" not in v for _, v in record.headers)


# -- upstream responses that try to poison the pool ------------------------------------------


def raw_answer(proxy: ProxyProcess, rid: str, answer: bytes) -> tuple[int | None, bool, bytes]:
    raw = request_bytes("GET", "/poison", [
        ("x-req-id", rid), ("x-upstream", "raw"),
        ("x-upstream-raw", base64.b64encode(answer).decode())])
    try:
        response = exchange(proxy.port, raw, timeout=10)
    except ConnectionError:
        return None, False, b""
    return response.status, response.complete, response.body


POISON = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nX-Poison: yes\r\n\r\npoison!"


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n" + POISON,
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello" + POISON,
], ids=["both-framing", "two-lengths", "bad-length", "extra-bytes"])
def test_poisoned_upstream_connections_are_never_reused(proxy: ProxyProcess, upstream: Upstream,
                                                        rid: str, answer: bytes) -> None:
    status, complete, body = raw_answer(proxy, rid, answer)
    assert b"poison" not in body
    if status is not None and status != 502:
        assert status == 200 and body == b"hello" and complete
    first = upstream.wait_record(rid)
    for i in range(5):
        response = exchange(proxy.port, request_bytes("GET", "/after", [("x-req-id", f"{rid}{i}")]))
        assert response.status == 200
        assert response.header("x-poison") is None and b"poison" not in response.body
        assert json.loads(response.body)["target"] == "/after"
        assert upstream.wait_record(f"{rid}{i}").conn_id != first.conn_id


def test_interim_responses_are_skipped(proxy: ProxyProcess, rid: str) -> None:
    answer = (b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
              b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal")
    status, complete, body = raw_answer(proxy, rid, answer)
    assert (status, complete, body) == (200, True, b"final")


# -- header abuse ------------------------------------------------------------------------------


@pytest.mark.parametrize("named", ["X-Forwarded-For", "Authorization", "Host"])
def test_connection_cannot_strip_what_the_proxy_sets(proxy: ProxyProcess, upstream: Upstream,
                                                     rid: str, named: str) -> None:
    raw = request_bytes("GET", "/conn", [("x-req-id", rid), ("Connection", named),
                                         ("Authorization", "Bearer t"),
                                         ("X-Forwarded-For", "6.6.6.6")])
    assert exchange(proxy.port, raw).status == 200
    record = upstream.wait_record(rid)
    assert record.header_all("host") == [upstream.url.removeprefix("http://")]
    assert record.header_all("x-forwarded-for") == ["127.0.0.1"]
    if named == "Authorization":
        assert record.header("authorization") is None  # hop-by-hop by the client's word


def test_several_connection_lines_one_empty(proxy: ProxyProcess, upstream: Upstream,
                                            rid: str) -> None:
    raw = request_bytes("GET", "/conn", [("x-req-id", rid), ("Connection", ""),
                                         ("Connection", "X-A"), ("X-A", "1"), ("X-B", "2")])
    assert exchange(proxy.port, raw).status == 200
    names = upstream.wait_record(rid).header_names()
    assert "x-a" not in names and "x-b" in names


def test_h2c_upgrade_is_never_forwarded(proxy: ProxyProcess, upstream: Upstream,
                                        rid: str) -> None:
    raw = request_bytes("GET", "/up", [("x-req-id", rid), ("Connection", "Upgrade, HTTP2-Settings"),
                                       ("Upgrade", "h2c"), ("HTTP2-Settings", "AAMAAABkAAQAAP__")])
    response = exchange(proxy.port, raw)
    assert response.status == 200
    names = upstream.wait_record(rid).header_names()
    assert not {"upgrade", "http2-settings", "connection"} & set(names)


@pytest.mark.parametrize(("count", "size"), [(200, 10), (1, 64 * 1024)],
                         ids=["200-headers", "64KB-header"])
def test_oversized_heads_are_refused_and_the_proxy_stays_healthy(
        proxy: ProxyProcess, upstream: Upstream, rid: str, count: int, size: int) -> None:
    headers = [("x-req-id", rid)] + [(f"X-H{i}", "v" * size) for i in range(count)]
    try:
        response = exchange(proxy.port, request_bytes("GET", "/big", headers), timeout=10)
    except ConnectionError:
        pass  # refused by closing: acceptable
    else:
        assert 400 <= response.status < 500
    time.sleep(0.2)
    assert upstream.find(rid) is None
    ok = exchange(proxy.port, request_bytes("GET", "/fine", [("x-req-id", rid + "-ok")]))
    assert ok.status == 200
