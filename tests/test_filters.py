"""The filter chain on every pairing (issue 19): order both ways, a filter's own
answer, body transforms and the framing fix-up, failures, refusals, `on_end`.

The proxy runs tests/chain_serve.py: probes A, B, C (outermost first) then a
request and a response hook; each request picks what the probes do with its
`x-filter-test` header.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from dualproxy import AsyncProxy, SyncProxy
from dualproxy.filters import Exchange, Filter
from tests.conftest import ProxyProcess
from tests.rawhttp import (
    Reader,
    connect,
    exchange,
    read_head,
    read_response,
    request_bytes,
    wait_until,
)
from tests.upstream import Upstream, pattern_bytes


class ChainProxy(ProxyProcess):
    module = "tests.chain_serve"


@pytest.fixture(scope="module")
def filtered(pairing: str, upstream: Upstream) -> Iterator[ProxyProcess]:
    with ChainProxy(pairing, upstream.url, ()) as proxy:
        yield proxy


def get(proxy: ProxyProcess, rid: str, tests: str, *, action: str = "echo",
        method: str = "GET", body: bytes | None = None,
        headers: list[tuple[str, str]] | None = None, version: str = "1.1") -> Any:
    raw = request_bytes(method, f"/f/{rid}", [("x-req-id", rid), ("x-filter-id", rid),
                                             ("x-filter-test", tests), ("x-upstream", action),
                                             *(headers or [])], body)
    if version != "1.1":
        raw = raw.replace(b"HTTP/1.1\r\n", f"HTTP/{version}\r\n".encode(), 1)
    return exchange(proxy.port, raw)


def ends(proxy: ProxyProcess, rid: str, count: int = 3) -> list[dict[str, Any]]:
    """The FILTER-END lines of `rid` (waits for `count` of them: one per probe)."""
    def lines() -> list[dict[str, Any]]:
        found = []
        for line in proxy.log().splitlines():
            _, marker, rest = line.partition("FILTER-END ")
            if marker:
                entry = json.loads(rest)
                if entry["rid"] == rid:
                    found.append(entry)
        return found

    assert wait_until(lambda: len(lines()) >= count), proxy.log()[-3000:]
    return lines()


def test_filters_run_in_order_both_ways(filtered: ProxyProcess, upstream: Upstream,
                                        rid: str) -> None:
    response = get(filtered, rid, "order")
    assert response.status == 200
    record = upstream.wait_record(rid)
    assert record.header_all("x-order") == ["A", "B", "C"]  # request: in order
    assert record.header("x-hook") == "request"  # the hooks run after the filters
    assert response.header_all("x-order-down") == ["C", "B", "A"]  # response: reversed
    # the response hook is the innermost: it runs first on the way down
    assert response.names().index("x-hook") < response.names().index("x-order-down")


def test_a_filter_answering_alone(filtered: ProxyProcess, upstream: Upstream,
                                  rid: str) -> None:
    response = get(filtered, rid, "order answer end")
    assert response.status == 203
    assert response.body == b"answered by B"
    assert response.header("x-answered-by") == "B"
    assert response.header("content-length") == str(len(b"answered by B"))
    # the filters outside B see its answer (and may change it); B and the inner ones do not
    assert response.header_all("x-order-down") == ["A"]
    assert response.header("x-hook") is None
    time.sleep(0.2)
    assert upstream.find(rid) is None  # no upstream was asked
    end = ends(filtered, rid)
    assert {e["filter"] for e in end} == {"A", "B", "C"}  # on_end: every filter, once
    assert all(e["status"] == 203 and e["outcome"] == "ok" for e in end)
    assert all(e["bytes_out"] == len(b"answered by B") for e in end)


def test_a_request_body_transform_reaches_the_upstream_chunked(
        filtered: ProxyProcess, upstream: Upstream, rid: str) -> None:
    body = b"hello, filters " * 5000
    response = get(filtered, rid, "upper-req", method="POST", body=body)
    assert response.status == 200
    record = upstream.wait_record(rid, complete=True)
    assert record.complete
    assert record.framing == "chunked"
    assert record.header("content-length") is None
    assert record.body == body.upper()


@pytest.mark.parametrize("chunked", [False, True])
def test_a_response_transform_drops_the_length_and_weakens_the_etag(
        filtered: ProxyProcess, rid: str, chunked: bool) -> None:
    headers = [("x-upstream-headers", json.dumps([["ETag", '"v1"'],
                                                  ["Content-Length", "5"]]))]
    if chunked:
        headers = [("x-upstream-headers", json.dumps([["ETag", '"v1"'],
                                                      ["Transfer-Encoding", "chunked"]]))]
    response = get(filtered, rid, "upper-resp", action="headers", headers=headers)
    assert response.status == 200
    assert response.header("x-transformed") == "yes"
    assert response.header("content-length") is None
    assert response.framing == "chunked" and response.complete
    assert response.body == (b"OK" if chunked else b"OOOOO")
    assert response.header("etag") == 'W/"v1"'


def test_an_http10_client_gets_a_transformed_body_close_delimited(
        filtered: ProxyProcess, rid: str) -> None:
    response = get(filtered, rid, "upper-resp", action="download size=70000", version="1.0")
    assert response.status == 200
    assert response.header("content-length") is None
    assert response.header("transfer-encoding") is None
    assert response.framing == "close"
    assert response.body == pattern_bytes(70000).upper()


def test_a_same_length_observer_keeps_the_framing(filtered: ProxyProcess, rid: str) -> None:
    response = get(filtered, rid, "observe", action="download size=70000")
    assert response.status == 200
    assert response.header("content-length") == "70000"
    assert response.body == pattern_bytes(70000)


@pytest.mark.parametrize("case", ["206", "304", "HEAD"])
def test_206_304_and_head_bodies_are_never_transformed(filtered: ProxyProcess, rid: str,
                                                       case: str) -> None:
    if case == "HEAD":
        response = get(filtered, rid, "upper-resp", method="HEAD",
                       action="download size=1000")
        assert response.header("content-length") == "1000"
    else:
        pairs = [["ETag", '"v1"']]
        if case == "206":
            pairs.append(["Content-Range", "bytes 0-1/10"])
        response = get(filtered, rid, "upper-resp", action=f"headers status={case}",
                       headers=[("x-upstream-headers", json.dumps(pairs))])
        assert response.status == int(case)
        if case == "206":
            assert response.body == b"ok"  # the upstream's bytes, not upper-cased
            assert response.header("content-length") == "2"
    assert response.header("x-transformed") == "no"
    assert response.header("etag") in (None, '"v1"')  # never weakened


def test_a_transform_failing_mid_body_aborts_the_client(filtered: ProxyProcess,
                                                        rid: str) -> None:
    response = get(filtered, rid, "raise-mid end",
                   action="download size=300000 chunked=1 chunk=65536")
    assert response.status == 200
    assert not response.complete  # never a clean end
    assert len(response.body) < 300000
    end = ends(filtered, rid)
    assert all(e["outcome"] == "upstream-broken" for e in end), end
    assert wait_until(lambda: "a body transform failed" in filtered.log())


def test_a_filter_refusing_with_proxy_error_is_a_problem(filtered: ProxyProcess,
                                                         upstream: Upstream, rid: str) -> None:
    response = get(filtered, rid, "refuse end")
    assert response.status == 429
    assert response.header("content-type") == "application/problem+json"
    assert json.loads(response.body)["status"] == 429
    time.sleep(0.2)
    assert upstream.find(rid) is None
    end = ends(filtered, rid)
    assert all(e["status"] == 429 and e["outcome"] == "refused" for e in end)


def test_on_end_sees_status_bytes_and_outcome(filtered: ProxyProcess, rid: str) -> None:
    body = b"x" * 1234
    response = get(filtered, rid, "end", method="POST", body=body,
                   action="download size=4321")
    assert response.status == 200
    end = ends(filtered, rid)
    assert len(end) == 3
    assert all(e["status"] == 200 and e["outcome"] == "ok" and e["bytes_out"] == 4321
               and e["bytes_in"] == 1234 for e in end), end


def test_on_end_sees_a_client_that_left(filtered: ProxyProcess, rid: str) -> None:
    raw = request_bytes("GET", f"/f/{rid}", [
        ("x-req-id", rid), ("x-filter-id", rid), ("x-filter-test", "end"),
        ("x-upstream", "trickle size=100000 interval=0.2 chunk=1000")])
    sock = connect(filtered.port)
    sock.sendall(raw)
    read_head(Reader(sock))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()
    end = ends(filtered, rid)
    assert all(e["outcome"] == "client-gone" for e in end), end


def test_hooks_still_run_beside_filters(filtered: ProxyProcess, upstream: Upstream,
                                        rid: str) -> None:
    response = get(filtered, rid, "")
    assert response.status == 200
    assert upstream.wait_record(rid).header("x-hook") == "request"
    assert response.header("x-hook") == "response"


def test_on_end_runs_for_websocket_sessions(filtered: ProxyProcess, upstream: Upstream,
                                            rid: str, pairing: str) -> None:
    """The handshake goes through the filters on the request, and on_end runs when
    the session ends (a refused handshake here: the upstream is no WebSocket server,
    so it answers the upgrade with its ordinary 200)."""
    raw = request_bytes("GET", f"/f/{rid}", [
        ("x-req-id", rid), ("x-filter-id", rid), ("x-filter-test", "order end"),
        ("Connection", "Upgrade"), ("Upgrade", "websocket"),
        ("Sec-WebSocket-Version", "13"), ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")])
    with connect(filtered.port, 10) as sock:
        sock.sendall(raw)
        try:
            read_response(Reader(sock))
        except ConnectionError:
            pass
    assert upstream.wait_record(rid).header_all("x-order") == ["A", "B", "C"]
    end = ends(filtered, rid)
    assert {e["filter"] for e in end} == {"A", "B", "C"}


class AsyncOnRequest(Filter):
    async def on_request(self, exchange: Exchange) -> None:
        return None


def test_an_async_filter_is_refused_by_sync_proxy_at_construction() -> None:
    with pytest.raises(TypeError, match="AsyncOnRequest.on_request"):
        SyncProxy("http://127.0.0.1:9", filters=[AsyncOnRequest()])
    AsyncProxy("http://127.0.0.1:9", filters=[AsyncOnRequest()])  # the async face runs it


def test_a_filter_answers_a_websocket_handshake(filtered: ProxyProcess, upstream: Upstream,
                                               rid: str) -> None:
    """A filter's Answer to a handshake is an HTTP response; no upstream is asked."""
    raw = request_bytes("GET", f"/f/{rid}", [
        ("x-req-id", rid), ("x-filter-id", rid), ("x-filter-test", "answer end"),
        ("Connection", "Upgrade"), ("Upgrade", "websocket"),
        ("Sec-WebSocket-Version", "13"), ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")])
    response = exchange(filtered.port, raw, timeout=10)
    assert response.status == 203
    assert response.body == b"answered by B"
    end = ends(filtered, rid)
    assert all(e["status"] == 203 for e in end), end
    assert upstream.find(rid) is None


def test_a_filter_answers_an_upstream_failure(filtered: ProxyProcess, upstream: Upstream,
                                             rid: str) -> None:
    """on_error: the upstream failed before its head (here: it resets the connection);
    the filter's answer goes to the client instead of the 502, and on_end sees it."""
    response = get(filtered, rid, "rescue end", action="reset")
    assert response.status == 200
    assert response.body == b"rescued: 502"
    end = ends(filtered, rid)
    assert all(e["status"] == 200 for e in end), end
    plain = get(filtered, rid + "-plain", "", action="reset")
    assert plain.status == 502  # without the filter's answer: the problem
