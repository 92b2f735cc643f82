"""Which headers cross the proxy, both ways, for every face x server pairing.

Hop-by-hop stripping, forwarding headers from the real peer, Host policy, no
invented headers, order and duplicates, cookies, and redirect rewriting.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import MakeProxy, ProxyProcess
from tests.rawhttp import RawResponse, exchange, request_bytes
from tests.upstream import Record, Upstream

FORWARDING = ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded"]


def send(proxy: ProxyProcess, rid: str, headers: list[tuple[str, str]] | None = None,
         target: str = "/h", method: str = "GET", host: str = "front.test") -> RawResponse:
    raw = request_bytes(method, target, [("x-req-id", rid), *(headers or [])], host=host)
    return exchange(proxy.port, raw)


def upstream_answers(proxy: ProxyProcess, rid: str, headers: list[list[str]],
                     target: str = "/h") -> RawResponse:
    """Make the upstream answer with exactly these response headers."""
    return send(proxy, rid, [("x-upstream", "headers"),
                             ("x-upstream-headers", json.dumps(headers))], target=target)


def authority(upstream: Upstream) -> str:
    return upstream.url.removeprefix("http://")


def test_request_hop_by_hop_headers_are_stripped(proxy: ProxyProcess, upstream: Upstream,
                                                 rid: str) -> None:
    response = send(proxy, rid, [
        ("Connection", "keep-alive, X-Secret"), ("Connection", "X-Other"),
        ("X-Secret", "s"), ("X-Other", "o"), ("Keep-Alive", "timeout=5"),
        ("Proxy-Connection", "keep-alive"), ("Proxy-Authorization", "Basic eA=="),
        ("TE", "gzip"), ("Trailer", "X-T"), ("Upgrade", "websocket"),
        ("HTTP2-Settings", "AAMAAABkAAQAAP__"), ("Proxy", "http://evil.example"),
        ("X-Kept", "yes"),
    ])
    assert response.status == 200
    names = upstream.wait_record(rid).header_names()
    assert "x-kept" in names
    for gone in ["connection", "x-secret", "x-other", "keep-alive", "proxy-connection",
                 "proxy-authorization", "te", "trailer", "upgrade", "http2-settings", "proxy"]:
        assert gone not in names


def test_te_trailers_is_the_one_te_forwarded(proxy: ProxyProcess, upstream: Upstream,
                                             rid: str) -> None:
    assert send(proxy, rid, [("TE", "trailers")]).status == 200
    assert upstream.wait_record(rid).header_all("te") == ["trailers"]


def test_response_hop_by_hop_headers_are_stripped(proxy: ProxyProcess, rid: str) -> None:
    response = upstream_answers(proxy, rid, [
        ["Connection", "X-Internal, X-Also"], ["X-Internal", "secret"], ["X-Also", "secret"],
        ["Keep-Alive", "timeout=99"], ["Proxy-Authenticate", "Basic"], ["Trailer", "X-T"],
        ["Upgrade", "h2c"], ["Proxy-Connection", "keep-alive"], ["X-Public", "ok"],
    ])
    assert response.status == 200
    names = response.names()
    assert "x-public" in names
    for gone in ["x-internal", "x-also", "keep-alive", "proxy-authenticate", "trailer",
                 "upgrade", "proxy-connection"]:
        assert gone not in names
    # Servers add their own Connection header; the upstream's tokens must not leak.
    assert all("x-internal" not in v.lower() for v in response.header_all("connection"))
    # (the value itself, not "99": the echoed random x-req-id may contain that)
    assert all("timeout=99" not in v for _, v in response.headers)


def test_host_is_the_upstream_authority(proxy: ProxyProcess, upstream: Upstream,
                                        rid: str) -> None:
    assert send(proxy, rid, host="front.test").status == 200
    record = upstream.wait_record(rid)
    assert record.header_all("host") == [authority(upstream)]
    assert record.header("x-forwarded-host") == "front.test"


def test_preserve_host_forwards_the_clients(make_proxy: MakeProxy, upstream: Upstream,
                                            rid: str) -> None:
    proxy = make_proxy("--preserve-host")
    assert send(proxy, rid, host="front.test").status == 200
    assert upstream.wait_record(rid).header_all("host") == ["front.test"]


def test_forwarding_headers_come_from_the_real_peer(proxy: ProxyProcess, upstream: Upstream,
                                                    rid: str) -> None:
    assert send(proxy, rid, [
        ("X-Forwarded-For", "6.6.6.6"), ("Forwarded", "for=6.6.6.6;proto=https"),
        ("X-Real-IP", "6.6.6.6"), ("X-Forwarded-Host", "evil.example"),
        ("X-Forwarded-Proto", "https"),
    ]).status == 200
    record = upstream.wait_record(rid)
    assert record.header_all("x-forwarded-for") == ["127.0.0.1"]
    assert record.header_all("x-forwarded-proto") == ["http"]
    assert record.header_all("x-forwarded-host") == ["front.test"]
    assert record.header_all("forwarded") == ["for=127.0.0.1;host=front.test;proto=http"]
    assert record.header("x-real-ip") is None
    assert not any(b"6.6.6.6" in v or b"evil" in v for _, v in record.headers)


def test_trusted_proxy_headers_are_appended_to(make_proxy: MakeProxy, upstream: Upstream,
                                               rid: str) -> None:
    proxy = make_proxy("--trusted-proxy", "127.0.0.1/32")
    assert send(proxy, rid, [
        ("X-Forwarded-For", "203.0.113.9"), ("Forwarded", "for=203.0.113.9"),
        ("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "www.example"),
    ]).status == 200
    record = upstream.wait_record(rid)
    assert record.header_all("x-forwarded-for") == ["203.0.113.9, 127.0.0.1"]
    assert record.header_all("forwarded") == [
        "for=203.0.113.9, for=127.0.0.1;host=front.test;proto=http"]
    assert record.header("x-forwarded-proto") == "https"
    assert record.header("x-forwarded-host") == "www.example"


def test_no_header_is_invented_upstream(proxy: ProxyProcess, upstream: Upstream,
                                        rid: str) -> None:
    assert send(proxy, rid).status == 200
    names = upstream.wait_record(rid).header_names()
    assert sorted(names) == sorted(["host", "x-req-id", *FORWARDING])


def test_request_order_and_duplicates_are_kept(proxy: ProxyProcess, upstream: Upstream,
                                               rid: str) -> None:
    assert send(proxy, rid, [("X-First", "1"), ("X-Dup", "a"), ("X-Middle", "m"),
                             ("X-Dup", "b"), ("X-Last", "z")]).status == 200
    record = upstream.wait_record(rid)
    names = [n for n in record.header_names() if n.startswith("x-") and n != "x-req-id"
             and n not in FORWARDING]
    values = record.header_all("x-dup")
    if proxy.adapter == "wsgi" and proxy.server == "gunicorn":
        # The WSGI environ merges repeats into one line (RFC 9110 5.3 allows it).
        assert values == ["a,b"]
        assert names == ["x-first", "x-dup", "x-middle", "x-last"]
    else:
        assert values == ["a", "b"]
        assert names == ["x-first", "x-dup", "x-middle", "x-dup", "x-last"]


def test_response_duplicates_and_order_are_kept(proxy: ProxyProcess, rid: str) -> None:
    response = upstream_answers(proxy, rid, [
        ["Set-Cookie", "a=1; Path=/"], ["X-Dup", "1"], ["Set-Cookie", "b=2; HttpOnly"],
        ["X-Dup", "2"], ["Set-Cookie", "c=3, d=4"],
    ])
    assert response.header_all("set-cookie") == ["a=1; Path=/", "b=2; HttpOnly", "c=3, d=4"]
    assert response.header_all("x-dup") == ["1", "2"]


def test_no_cookie_jar_between_clients(proxy: ProxyProcess, upstream: Upstream,
                                       rid: str) -> None:
    first = upstream_answers(proxy, rid + "-a", [["Set-Cookie", "session=alice; Path=/"]])
    assert first.header("set-cookie") == "session=alice; Path=/"
    assert send(proxy, rid + "-b").status == 200
    assert upstream.wait_record(rid + "-b").header("cookie") is None
    # A client's own cookie still passes, untouched.
    assert send(proxy, rid + "-c", [("Cookie", "mine=1; other=2")]).status == 200
    assert upstream.wait_record(rid + "-c").header_all("cookie") == ["mine=1; other=2"]


@pytest.fixture
def mounted(make_proxy: MakeProxy) -> ProxyProcess:
    return make_proxy("--mount", "/api", upstream_path="/base")


def test_redirects_to_the_base_are_rewritten_to_the_mount(mounted: ProxyProcess,
                                                          upstream: Upstream, rid: str) -> None:
    base = upstream.url + "/base"
    response = send(mounted, rid, [
        ("x-upstream", "headers status=302"),
        ("x-upstream-headers", json.dumps([
            ["Location", base + "/next?x=1"], ["Content-Location", base + "/doc"],
            ["Refresh", f"3; url={base}/later"]])),
    ], target="/api/go")
    assert response.status == 302
    assert response.header("location") == "/api/next?x=1"
    assert response.header("content-location") == "/api/doc"
    assert response.header("refresh") == "3; url=/api/later"
    assert len(upstream.find_all(rid)) == 1  # relayed, not followed


def test_foreign_redirects_are_untouched(mounted: ProxyProcess, upstream: Upstream,
                                         rid: str) -> None:
    response = send(mounted, rid, [
        ("x-upstream", "status code=301 location=https://elsewhere.example/base/x")],
        target="/api/go")
    assert response.status == 301
    assert response.header("location") == "https://elsewhere.example/base/x"


def test_latin1_header_values_pass_unchanged(proxy: ProxyProcess, upstream: Upstream,
                                             rid: str) -> None:
    value = "caf\xe9 \xfc"
    raw = request_bytes("GET", "/h", [("x-req-id", rid), ("X-Latin", value)])
    assert exchange(proxy.port, raw).status == 200
    assert upstream.wait_record(rid).header("x-latin") == value


def test_one_date_and_one_server(proxy: ProxyProcess, rid: str) -> None:
    response = upstream_answers(proxy, rid, [["Date", "Mon, 01 Jan 2001 00:00:00 GMT"],
                                             ["Server", "upstream/1.0"]])
    assert len(response.header_all("date")) == 1
    assert len(response.header_all("server")) == 1
    assert response.header("server") != "upstream/1.0"


def test_httpx_client_sees_the_same(proxy: ProxyProcess, upstream: Upstream, rid: str) -> None:
    """A high-level client gets the same duplicates the raw one does."""
    with proxy.client() as client:
        response = client.get("/h", headers={
            "x-req-id": rid, "x-upstream": "headers",
            "x-upstream-headers": json.dumps([["Set-Cookie", "a=1"], ["Set-Cookie", "b=2"]])})
    assert response.headers.get_list("set-cookie") == ["a=1", "b=2"]
    record: Record = upstream.wait_record(rid)
    assert record.header("user-agent") == f"python-httpx/{httpx.__version__}"
