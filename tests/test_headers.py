"""Which headers cross the proxy, both ways, for every face x server pairing.

Hop-by-hop stripping, forwarding headers from the real peer, Host policy, no
invented headers, order and duplicates, cookies, redirect rewriting, raw bytes.
Requests are written with raw sockets so that the only headers sent are the
ones the test wrote; the upstream's record shows exactly what arrived.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.conftest import MakeProxy, ProxyProcess, xfail_on_granian
from tests.rawhttp import RawResponse, exchange, request_bytes
from tests.upstream import Record, Upstream

FORWARDING = ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded"]


def send(proxy: ProxyProcess, rid: str, headers: list[tuple[str, str]] | None = None,
         target: str = "/h", method: str = "GET", host: str = "front.test") -> RawResponse:
    raw = request_bytes(method, target, [("x-req-id", rid), *(headers or [])], host=host)
    return exchange(proxy.port, raw)


def upstream_answers(proxy: ProxyProcess, rid: str, headers: list[list[str]],
                     target: str = "/h", status: int = 200) -> RawResponse:
    """Make the upstream answer with exactly these response headers."""
    return send(proxy, rid, [("x-upstream", f"headers status={status}"),
                             ("x-upstream-headers", json.dumps(headers))], target=target)


def authority(upstream: Upstream) -> str:
    return upstream.url.removeprefix("http://")


def comma_list(values: list[str]) -> list[str]:
    """Several lines of a list header as one list of elements (RFC 9110 5.3)."""
    return [item.strip() for value in values for item in value.split(",")]


def joins_duplicates(proxy: ProxyProcess) -> bool:
    """gunicorn's WSGI environ merges repeated request headers into one `a,b` line."""
    return proxy.adapter == "wsgi" and proxy.server == "gunicorn"


def own_names(record: Record) -> list[str]:
    """Header names the test itself sent, in arrival order (minus x-req-id and forwarding)."""
    return [n for n in record.header_names()
            if n not in ("host", "x-req-id", *FORWARDING)]


# --- hop-by-hop, request direction --------------------------------------------------------

def test_request_hop_by_hop_headers_are_stripped(proxy: ProxyProcess, upstream: Upstream,
                                                 rid: str) -> None:
    response = send(proxy, rid, [
        ("X-Before", "b"),
        ("Connection", "keep-alive, X-Secret"), ("Connection", "x-other"),
        ("X-Secret", "leak-secret"), ("X-Other", "leak-other"), ("Keep-Alive", "leak-ka=5"),
        ("Proxy-Connection", "leak-pc"), ("Proxy-Authorization", "Basic bGVhaw=="),
        ("TE", "gzip"), ("Trailer", "X-Leak-Trailer"), ("Upgrade", "leak-upgrade"),
        ("HTTP2-Settings", "AAMAAABkAAQAAP__"), ("Proxy", "http://leak.example"),
        ("X-Kept", "yes"),
    ])
    record = upstream.wait_record(rid)
    assert response.status == 200
    assert own_names(record) == ["x-before", "x-kept"]
    assert not any(b"leak" in v.lower() or v == b"AAMAAABkAAQAAP__" for _, v in record.headers)


@pytest.mark.parametrize(("te", "forwarded"), [
    ("trailers", ["trailers"]),
    ("TRAILERS", ["trailers"]),
    ("gzip, trailers", ["trailers"]),
    ("deflate;q=0.5, Trailers", ["trailers"]),
    ("gzip", []),
    ("x-trailersish", []),
])
def test_te_only_trailers_is_forwarded(proxy: ProxyProcess, upstream: Upstream, rid: str,
                                       te: str, forwarded: list[str]) -> None:
    assert send(proxy, rid, [("TE", te)]).status == 200
    assert upstream.wait_record(rid).header_all("te") == forwarded


# --- hop-by-hop, response direction -------------------------------------------------------

def test_response_hop_by_hop_headers_are_stripped(proxy: ProxyProcess, rid: str) -> None:
    response = upstream_answers(proxy, rid, [
        ["X-Before", "b"],
        ["Connection", "X-Internal, x-also"], ["Connection", "X-Third"],
        ["X-Internal", "leak-1"], ["X-Also", "leak-2"], ["X-Third", "leak-3"],
        ["Keep-Alive", "timeout=99, leak=4"], ["Proxy-Authenticate", "Basic realm=leak5"],
        ["Proxy-Authorization", "Basic leak6"], ["Proxy-Connection", "leak7"],
        ["Trailer", "X-Leak8"], ["Upgrade", "leak9"], ["TE", "leak10"],
        ["HTTP2-Settings", "leak11"], ["Proxy", "http://leak12.example"],
        ["X-Public", "ok"],
    ])
    assert response.status == 200 and response.complete
    names = response.names()
    assert names.index("x-before") < names.index("x-public")
    for gone in ["x-internal", "x-also", "x-third", "keep-alive", "proxy-authenticate",
                 "proxy-authorization", "proxy-connection", "trailer", "upgrade", "te",
                 "http2-settings", "proxy"]:
        assert gone not in names
    # Servers add their own Connection / Transfer-Encoding; none of the upstream's
    # values may ride along in them (nor anywhere else).
    assert not any("leak" in v.lower() or "x-internal" in v.lower() for _, v in response.headers)


# --- Host ---------------------------------------------------------------------------------

def test_host_is_the_upstream_authority(proxy: ProxyProcess, upstream: Upstream,
                                        rid: str) -> None:
    assert send(proxy, rid, host="front.test").status == 200
    record = upstream.wait_record(rid)
    assert record.header_all("host") == [authority(upstream)]
    assert record.header_names()[0] == "host"
    assert record.header("x-forwarded-host") == "front.test"


@pytest.mark.parametrize("hosts", [["a.test", "b.test"], ["a.test", "a.test"],
                                   ["a b/c"], ["evil.example/x"], ["user@evil.example"]])
def test_several_or_invalid_hosts_are_refused(proxy: ProxyProcess, upstream: Upstream, rid: str,
                                              hosts: list[str]) -> None:
    """RFC 9112 3.2: 400, on every server (gunicorn refuses two Hosts itself, uvicorn not)."""
    lines = [f"Host: {h}" for h in hosts]
    raw = "\r\n".join(["GET /h HTTP/1.1", *lines, f"x-req-id: {rid}", "", ""]).encode()
    response = exchange(proxy.port, raw)
    assert response.status == 400
    if not (joins_duplicates(proxy) and len(hosts) > 1):  # gunicorn refuses those itself
        assert response.header("content-type") == "application/problem+json"
    time.sleep(0.2)
    assert upstream.find(rid) is None


def test_http11_without_host_is_refused(proxy: ProxyProcess, upstream: Upstream,
                                        rid: str) -> None:
    """RFC 9112 3.2: 400 (as nginx and Go answer); neither uvicorn nor gunicorn checks it."""
    response = exchange(proxy.port, f"GET /h HTTP/1.1\r\nx-req-id: {rid}\r\n\r\n".encode())
    assert response.status == 400
    assert response.header("content-type") == "application/problem+json"
    time.sleep(0.2)
    assert upstream.find(rid) is None


def test_http10_without_host_gets_the_upstream_authority(proxy: ProxyProcess,
                                                         upstream: Upstream, rid: str) -> None:
    response = exchange(proxy.port, f"GET /h HTTP/1.0\r\nx-req-id: {rid}\r\n\r\n".encode())
    record = upstream.wait_record(rid)
    assert response.status == 200
    assert record.header_all("host") == [authority(upstream)]
    assert record.header_names() == ["host", "x-req-id", *FORWARDING]


def test_a_chunked_answer_to_an_http10_client_ends_with_the_close(
        proxy: ProxyProcess, upstream: Upstream, rid: str) -> None:
    """HTTP/1.0 has no chunked coding (RFC 9112 6.3): a body without a length goes to
    an HTTP/1.0 client as is and ends with the connection. uvicorn's httptools
    protocol chunked it (dualproxy's protocol class corrects that)."""
    response = exchange(proxy.port, (
        f"GET /h HTTP/1.0\r\nx-req-id: {rid}\r\n"
        "x-upstream: download size=70000 chunked=1 chunk=1000\r\n\r\n").encode())
    assert response.status == 200
    assert response.framing == "close" and response.complete
    assert response.header("transfer-encoding") is None
    assert len(response.body) == 70000


def test_preserve_host_forwards_the_clients(make_proxy: MakeProxy, upstream: Upstream,
                                            rid: str) -> None:
    proxy = make_proxy("--preserve-host")
    response = send(proxy, rid, host="front.test:8080")
    record = upstream.wait_record(rid)
    assert response.status == 200
    assert record.header_all("host") == ["front.test:8080"]
    assert record.header("x-forwarded-host") == "front.test:8080"


# --- forwarding headers -------------------------------------------------------------------

def test_forwarding_headers_come_from_the_real_peer(proxy: ProxyProcess, upstream: Upstream,
                                                    rid: str) -> None:
    assert send(proxy, rid).status == 200
    record = upstream.wait_record(rid)
    assert record.header_all("x-forwarded-for") == ["127.0.0.1"]
    assert record.header_all("x-forwarded-proto") == ["http"]
    assert record.header_all("x-forwarded-host") == ["front.test"]
    assert record.header_all("forwarded") == ["for=127.0.0.1;host=front.test;proto=http"]


def test_spoofed_forwarding_headers_are_dropped(proxy: ProxyProcess, upstream: Upstream,
                                                rid: str) -> None:
    """An untrusted peer cannot claim another address (nor make the server believe it)."""
    assert send(proxy, rid, [
        ("X-Forwarded-For", "6.6.6.6"), ("x-forwarded-for", "6.6.6.7"),
        ("Forwarded", "for=6.6.6.6;proto=https"), ("X-Real-IP", "6.6.6.6"),
        ("X-Forwarded-Host", "evil.example"), ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Port", "6666"), ("X-Forwarded-Prefix", "/evil"),
    ]).status == 200
    record = upstream.wait_record(rid)
    assert record.header_all("x-forwarded-for") == ["127.0.0.1"]
    assert record.header_all("x-forwarded-proto") == ["http"]
    assert record.header_all("x-forwarded-host") == ["front.test"]
    assert record.header_all("forwarded") == ["for=127.0.0.1;host=front.test;proto=http"]
    for name in ("x-real-ip", "x-forwarded-port", "x-forwarded-prefix"):
        assert record.header(name) is None
    assert not any(b"6.6.6" in v or b"evil" in v or b"6666" in v for _, v in record.headers)


def test_trusted_proxy_headers_are_appended_to(make_proxy: MakeProxy, upstream: Upstream,
                                               rid: str) -> None:
    proxy = make_proxy("--trusted-proxy", "127.0.0.1/32")
    assert send(proxy, rid, [
        ("X-Forwarded-For", "203.0.113.9"), ("X-Forwarded-For", "198.51.100.7"),
        ("Forwarded", "for=203.0.113.9"),
        ("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "www.example"),
    ]).status == 200
    record = upstream.wait_record(rid)
    # One line, the inbound chain in order, the real peer last (never the server's rewrite).
    assert len(record.header_all("x-forwarded-for")) == 1
    assert comma_list(record.header_all("x-forwarded-for")) == [
        "203.0.113.9", "198.51.100.7", "127.0.0.1"]
    assert record.header_all("forwarded") == [
        "for=203.0.113.9, for=127.0.0.1;host=front.test;proto=http"]
    assert record.header_all("x-forwarded-proto") == ["https"]
    assert record.header_all("x-forwarded-host") == ["www.example"]


def test_a_peer_outside_the_trusted_range_is_not_believed(make_proxy: MakeProxy,
                                                          upstream: Upstream, rid: str) -> None:
    proxy = make_proxy("--trusted-proxy", "10.0.0.0/8")
    assert send(proxy, rid, [("X-Forwarded-For", "203.0.113.9"),
                             ("Forwarded", "for=203.0.113.9")]).status == 200
    record = upstream.wait_record(rid)
    assert record.header_all("x-forwarded-for") == ["127.0.0.1"]
    assert record.header_all("forwarded") == ["for=127.0.0.1;host=front.test;proto=http"]


# --- nothing invented, order and duplicates kept ------------------------------------------

def test_no_header_is_invented_upstream(proxy: ProxyProcess, upstream: Upstream,
                                        rid: str) -> None:
    """Only Host (and the id the test needs) was sent: no User-Agent, Accept, Connection..."""
    assert send(proxy, rid).status == 200
    record = upstream.wait_record(rid)
    assert record.header_names() == ["host", "x-req-id", *FORWARDING]
    assert record.framing == "none"


def test_request_order_and_duplicates_are_kept(proxy: ProxyProcess, upstream: Upstream,
                                               rid: str, request: pytest.FixtureRequest) -> None:
    xfail_on_granian(request, "header-order")
    assert send(proxy, rid, [("X-First", "1"), ("X-Dup", "a"), ("X-Middle", "m"),
                             ("X-Dup", "b"), ("X-Last", "z"), ("X-Dup", "c")]).status == 200
    record = upstream.wait_record(rid)
    values = record.header_all("x-dup")
    if joins_duplicates(proxy) and values == ["a,b,c"]:
        # RFC 9110 5.3 allows the merge; the order of the values is still kept.
        assert own_names(record) == ["x-first", "x-dup", "x-middle", "x-last"]
    else:
        assert values == ["a", "b", "c"]
        assert own_names(record) == ["x-first", "x-dup", "x-middle", "x-dup", "x-last", "x-dup"]


def test_response_duplicates_and_order_are_kept(proxy: ProxyProcess, rid: str,
                                                request: pytest.FixtureRequest) -> None:
    xfail_on_granian(request, "header-order")
    response = upstream_answers(proxy, rid, [
        ["Set-Cookie", "a=1; Path=/"], ["X-Dup", "1"], ["Set-Cookie", "b=2; HttpOnly"],
        ["X-Dup", "2"], ["Set-Cookie", "c=3; Expires=Wed, 21 Oct 2037 07:28:00 GMT"],
    ])
    assert response.header_all("set-cookie") == [
        "a=1; Path=/", "b=2; HttpOnly", "c=3; Expires=Wed, 21 Oct 2037 07:28:00 GMT"]
    assert response.header_all("x-dup") == ["1", "2"]
    names = [n for n in response.names() if n in ("set-cookie", "x-dup")]
    assert names == ["set-cookie", "x-dup", "set-cookie", "x-dup", "set-cookie"]


# --- cookies: no jar ----------------------------------------------------------------------

def test_no_cookie_jar_between_clients(proxy: ProxyProcess, upstream: Upstream,
                                       rid: str) -> None:
    first = upstream_answers(proxy, rid + "-a", [
        ["Set-Cookie", "session=alice; Path=/"],
        ["Set-Cookie", f"other=x; Domain={authority(upstream).split(':')[0]}; Path=/"]])
    assert first.header_all("set-cookie")[0] == "session=alice; Path=/"
    for suffix in ("-b", "-c"):  # another user, twice (a pooled connection, a new one)
        assert send(proxy, rid + suffix).status == 200
        assert upstream.wait_record(rid + suffix).header("cookie") is None
    # A client's own cookie still passes, untouched.
    assert send(proxy, rid + "-d", [("Cookie", "mine=1; other=2")]).status == 200
    assert upstream.wait_record(rid + "-d").header_all("cookie") == ["mine=1; other=2"]


# --- redirects ----------------------------------------------------------------------------

@pytest.fixture
def mounted(make_proxy: MakeProxy) -> ProxyProcess:
    return make_proxy("--mount", "/api", upstream_path="/base")


def test_redirects_to_the_base_are_rewritten_to_the_mount(mounted: ProxyProcess,
                                                          upstream: Upstream, rid: str) -> None:
    base = upstream.url + "/base"
    response = upstream_answers(mounted, rid, [
        ["Location", f"{base}/next"], ["Content-Location", f"{base}/doc?x=1"],
        ["Refresh", f"3; url={base}/later"]], target="/api/go", status=302)
    assert response.status == 302
    assert response.header_all("location") == ["/api/next"]
    assert response.header_all("content-location") == ["/api/doc?x=1"]
    assert response.header_all("refresh") == ["3; url=/api/later"]
    assert len(upstream.find_all(rid)) == 1  # relayed, not followed


@pytest.mark.parametrize(("location", "expected"), [
    ("{base}", "/api"),
    ("{base}/", "/api/"),
    ("{base}?q=1", "/api?q=1"),
    ("/base/x", "/api/x"),
])
def test_base_location_spellings_are_rewritten(mounted: ProxyProcess, upstream: Upstream,
                                               rid: str, location: str, expected: str) -> None:
    location = location.format(base=upstream.url + "/base")
    response = upstream_answers(mounted, rid, [["Location", location]], target="/api/go",
                                status=301)
    assert response.status == 301
    assert response.header_all("location") == [expected]


@pytest.mark.parametrize("location", [
    "https://elsewhere.example/base/x",
    "http://elsewhere.example{port}/base/x",
    "{origin}/other/x",
    "{origin}/basement",
    "/other/x",
    "/basement",
    "next",
])
def test_foreign_redirects_are_untouched(mounted: ProxyProcess, upstream: Upstream, rid: str,
                                         location: str) -> None:
    port = ":" + authority(upstream).split(":")[1]
    location = location.format(origin=upstream.url, port=port)
    response = upstream_answers(mounted, rid, [["Location", location]], target="/api/go",
                                status=302)
    assert response.status == 302
    assert response.header_all("location") == [location]


@pytest.fixture
def mounted_at_root(make_proxy: MakeProxy) -> ProxyProcess:
    """`--mount /api` in front of an upstream URL with no path: its base is the root."""
    return make_proxy("--mount", "/api")


@pytest.mark.parametrize(("name", "value", "expected"), [
    ("Location", "/sub/", "/api/sub/"),        # python -m http.server's directory redirect
    ("Location", "/", "/api/"),
    ("Location", "/a/b?q=1#f", "/api/a/b?q=1#f"),
    ("Content-Location", "/doc?x=1", "/api/doc?x=1"),
    ("Refresh", "0; url=/later", "0; url=/api/later"),
    ("Location", "//elsewhere.example/x", "//elsewhere.example/x"),  # another host
    ("Location", "sub/", "sub/"),              # relative: the client resolves it on /api
    ("Location", "https://elsewhere.example/x", "https://elsewhere.example/x"),
])
def test_path_only_redirects_under_a_root_base_are_rewritten(
        mounted_at_root: ProxyProcess, rid: str, name: str, value: str, expected: str) -> None:
    response = upstream_answers(mounted_at_root, rid, [[name, value]], target="/api/sub",
                                status=301)
    assert response.status == 301
    assert response.header_all(name.lower()) == [expected]


@pytest.mark.parametrize(("method", "code"), [("GET", 302), ("POST", 307), ("PUT", 308)])
def test_redirects_are_relayed_not_followed(proxy: ProxyProcess, upstream: Upstream, rid: str,
                                            method: str, code: int) -> None:
    body = b"payload" if method != "GET" else None
    raw = request_bytes(method, "/from", [
        ("x-req-id", rid),
        ("x-upstream", f"status code={code} location={upstream.url}/to body=moved")], body)
    response = exchange(proxy.port, raw)
    assert response.status == code
    assert response.header_all("location") == ["/to"]  # the upstream's own origin, rewritten
    assert response.body == b"moved"
    records = upstream.find_all(rid)
    assert [(r.method, r.target) for r in records] == [(method, b"/from")]
    assert records[0].body == (body or b"")


# --- raw bytes in values ------------------------------------------------------------------

OBS_TEXT = ["caf\xe9 \xfc", "caf\xc3\xa9 \xe2\x9c\x93", "a\xff\x80b", "  x\ty  "]


def test_obs_text_request_values_pass_unchanged(proxy: ProxyProcess, upstream: Upstream,
                                                rid: str) -> None:
    headers = [(f"X-Raw-{i}", value) for i, value in enumerate(OBS_TEXT)]
    assert send(proxy, rid, headers).status == 200
    record = upstream.wait_record(rid)
    # Bytes as sent (latin-1 for the header text); only the outer whitespace is not value.
    assert [record.header(f"x-raw-{i}") for i in range(len(OBS_TEXT))] == [
        v.strip(" \t") for v in OBS_TEXT]


def test_obs_text_response_values_pass_unchanged(proxy: ProxyProcess, rid: str) -> None:
    # The upstream writes each character as one latin-1 byte (so UTF-8 arrives as bytes).
    response = upstream_answers(proxy, rid, [[f"X-Raw-{i}", v] for i, v in enumerate(OBS_TEXT)])
    assert response.status == 200
    assert [response.header(f"x-raw-{i}") for i in range(len(OBS_TEXT))] == [
        v.strip(" \t") for v in OBS_TEXT]


# --- the front server's own fields --------------------------------------------------------

def test_one_date_and_one_server(proxy: ProxyProcess, rid: str) -> None:
    response = upstream_answers(proxy, rid, [["Date", "Mon, 01 Jan 2001 00:00:00 GMT"],
                                             ["Server", "upstream/1.0"]])
    assert response.status == 200
    assert len(response.header_all("date")) == 1
    assert len(response.header_all("server")) == 1
    assert response.header("server") != "upstream/1.0"


def test_httpx_client_sees_the_same(proxy: ProxyProcess, upstream: Upstream, rid: str) -> None:
    """A high-level client gets the same duplicates, and its own headers pass untouched."""
    with proxy.client() as client:
        response = client.get("/h", headers={
            "x-req-id": rid, "x-upstream": "headers",
            "x-upstream-headers": json.dumps([["Set-Cookie", "a=1"], ["Set-Cookie", "b=2"]])})
    assert response.headers.get_list("set-cookie") == ["a=1", "b=2"]
    record = upstream.wait_record(rid)
    assert record.header("user-agent") == f"python-httpx/{httpx.__version__}"
    assert record.header("accept-encoding") == response.request.headers["accept-encoding"]
    assert record.header("connection") is None
