"""Unit and property tests of the pure core: target mapping and header policy.

No server here: these pin the decisions both faces share. The behaviour tests
prove the same on the wire for every pairing.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dualproxy import headers as headers_module
from dualproxy.config import ProxyConfig
from dualproxy.core import (
    BodyCounter,
    IncomingRequest,
    build_request,
    plan_request,
    plan_response,
)
from dualproxy.errors import (
    BadGateway,
    BadRequest,
    BodyTooLarge,
    GatewayTimeout,
    HeadersTooLarge,
    IncompleteBody,
    NotProxied,
    ServiceUnavailable,
    TargetTooLong,
    map_upstream_errors,
)
from dualproxy.headers import HOP_BY_HOP, request_headers, response_headers
from dualproxy.target import (
    check_traversal,
    choose_mount,
    join_base,
    origin_form,
    split_target,
    upstream_target,
)

CONFIG = ProxyConfig.build("http://up.example:8080/base", mount="/api")
ROOT = ProxyConfig.build("http://up.example:8080")


def incoming(target: bytes = b"/api/x", headers: list[tuple[bytes, bytes]] | None = None,
             method: str = "GET", peer: str | None = "10.0.0.7") -> IncomingRequest:
    headers = list(headers) if headers is not None else []
    if not any(name == b"host" for name, _ in headers):
        headers.insert(0, (b"host", b"front"))  # HTTP/1.1 requires one (400 without)
    return IncomingRequest(method=method, target=target, headers=headers, peer=peer,
                           scheme="https")


# -- target ------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "expected"), [
    (b"/api/x", b"/base/x"),
    (b"/api", b"/base"),
    (b"/api/", b"/base/"),
    (b"/api/a%2Fb?x&y=", b"/base/a%2Fb?x&y="),
    (b"/api/a/../b", b"/base/a/../b"),
    (b"/api//evil/x", b"/base//evil/x"),
    (b"http://evil.example/api/x?q", b"/base/x?q"),
    (b"/api/x?a#frag", b"/base/x?a"),
    (b"/api#/../../x", b"/base"),
])
def test_target_is_byte_exact_below_the_base(raw: bytes, expected: bytes) -> None:
    assert upstream_target(raw, b"/api", CONFIG.upstream_base, 8000) == expected


@pytest.mark.parametrize("raw", [b"/apix", b"/other/api/x", b"/"])
def test_paths_outside_the_mount_are_not_proxied(raw: bytes) -> None:
    with pytest.raises(NotProxied):
        upstream_target(raw, b"/api", b"/base", 8000)


@pytest.mark.parametrize("rest", [
    b"/..", b"/../x", b"/%2e%2e/x", b"/.%2E/x", b"/..%2fx", b"/..%5Cx", b"/..\\x",
    b"/a/../../x", b"/..;/x", b"/%00", b"/./../x",
])
def test_escaping_dot_segments_are_refused(rest: bytes) -> None:
    with pytest.raises(BadRequest):
        check_traversal(rest)


@pytest.mark.parametrize("raw", [b"/x y", b"/x\x00", b"/\xc3\xa9", b"*", b"evil.example:443"])
def test_malformed_targets_are_refused(raw: bytes) -> None:
    with pytest.raises(BadRequest):
        upstream_target(raw, b"", b"", 8000)


def test_overlong_target_is_414() -> None:
    with pytest.raises(TargetTooLong):
        upstream_target(b"/" + b"a" * 9000, b"", b"", 8000)


_path_char = st.sampled_from(list("abcXYZ019-._~!$&'()*+,;=:@") + ["%2F", "%2f", "%20", "%25",
                                                                    "%C3%A9", "/", "//"])
_query_char = st.sampled_from(list("abc019-._~!$&'()*+,;=:@/?") + ["%26", "%3D", "%2F", "=", "&"])


@given(path=st.lists(_path_char, max_size=30).map("".join),
       query=st.none() | st.lists(_query_char, max_size=20).map("".join))
def test_any_path_and_query_round_trip_byte_exact(path: str, query: str | None) -> None:
    rest = ("/" + path).encode()
    raw = b"/api" + rest + (b"" if query is None else b"?" + query.encode())
    try:
        check_traversal(rest)
    except BadRequest:
        return  # hypothesis built a climbing path; covered by the next property
    target = upstream_target(raw, b"/api", b"/base", 1 << 16)
    expected_path = b"/base" + rest
    assert target == expected_path + (b"" if query is None else b"?" + query.encode())


def _target_by_every_step(raw: bytes, mount: bytes, base: bytes, max_bytes: int,
                          mounts: tuple[bytes, ...]) -> bytes:
    """upstream_target's general steps, none skipped (its quick way for plain targets
    must give the same answer or refusal)."""
    path, query = split_target(origin_form(raw, max_bytes))
    if choose_mount(path, mounts or (mount,)) != mount:
        raise NotProxied("no proxy is mounted at this path")
    rest = path[len(mount):]
    check_traversal(rest)
    target = join_base(base, rest)
    return target if query is None else target + b"?" + query


_target_piece = st.sampled_from(["/", "//", "/.", "/..", ".", "a", "api", "%2e", "%2F", "%00",
                                 ";x", "\\", "?", "#", "&=", " ", "\x7f", "\xe9", ":", "~"])


@given(pieces=st.lists(_target_piece, max_size=12), lead=st.sampled_from(["/", "", "/api"]),
       mount=st.sampled_from([b"", b"/api"]), base=st.sampled_from([b"", b"/base"]),
       routed=st.booleans())
@settings(max_examples=500, deadline=None)
def test_plain_targets_take_the_same_way(pieces: list[str], lead: str, mount: bytes,
                                          base: bytes, routed: bool) -> None:
    raw = (lead + "".join(pieces)).encode("latin-1")
    mounts = (b"", b"/api") if routed else ()
    try:
        expected: bytes | type[Exception] = _target_by_every_step(raw, mount, base, 64, mounts)
    except (BadRequest, NotProxied, TargetTooLong) as exc:
        expected = type(exc)
    try:
        got: bytes | type[Exception] = upstream_target(raw, mount, base, 64, mounts)
    except (BadRequest, NotProxied, TargetTooLong) as exc:
        got = type(exc)
    assert got == expected


_segment = st.sampled_from(["..", "%2e%2e", ".%2E", "..;x", ".", "a", "b%2Fc", ""])
_separator = st.sampled_from(["/", "\\", "%2f", "%5C"])


@given(st.lists(st.tuples(_separator, _segment), min_size=1, max_size=12))
@settings(max_examples=300)
def test_no_generated_path_escapes_the_base(parts: list[tuple[str, str]]) -> None:
    rest = "".join(sep + seg for sep, seg in parts).encode()
    # Model: a backend that decodes %2e, %2f and %5c and treats `\\` as `/`.
    decoded = rest.decode()
    for spelled, plain in (("%2e", "."), ("%2E", "."), ("%2f", "/"), ("%2F", "/"),
                           ("%5c", "/"), ("%5C", "/"), ("\\", "/")):
        decoded = decoded.replace(spelled, plain)
    depth = 0
    escapes = False
    for seg in decoded.split("/"):
        name = seg.split(";")[0]
        if name == "..":
            depth -= 1
            escapes = escapes or depth < 0
        elif name not in ("", "."):
            depth += 1
    if escapes:
        with pytest.raises(BadRequest):
            check_traversal(rest)
    else:
        check_traversal(rest)


# -- request headers ---------------------------------------------------------


def names(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [n for n, _ in headers]


def test_hop_by_hop_and_connection_named_headers_are_stripped() -> None:
    headers = [
        (b"host", b"front"), (b"connection", b"keep-alive, X-Secret"),
        (b"connection", b"x-other"), (b"x-secret", b"1"), (b"x-other", b"2"),
        (b"keep-alive", b"timeout=5"), (b"proxy", b"http://evil"), (b"te", b"gzip"),
        (b"upgrade", b"h2c"), (b"http2-settings", b"AAA"), (b"proxy-authorization", b"x"),
        (b"x-kept", b"yes"),
    ]
    out = request_headers(headers, CONFIG, peer="10.0.0.7", scheme="http")
    got = names(out)
    assert b"x-kept" in got
    for name in [b"connection", b"x-secret", b"x-other", b"keep-alive", b"proxy", b"te",
                 b"upgrade", b"http2-settings", b"proxy-authorization"]:
        assert name not in got


def test_te_trailers_survives_alone() -> None:
    out = request_headers([(b"te", b"trailers, gzip")], CONFIG, peer=None, scheme="http")
    assert (b"te", b"trailers") in out


def test_host_is_the_upstream_authority_unless_preserved() -> None:
    out = request_headers([(b"host", b"front")], CONFIG, peer="1.2.3.4", scheme="http")
    assert out[0] == (b"host", b"up.example:8080")
    keep = ProxyConfig.build("http://up.example", preserve_host=True)
    out = request_headers([(b"host", b"front")], keep, peer="1.2.3.4", scheme="http")
    assert out[0] == (b"host", b"front")


def test_forwarding_headers_from_an_untrusted_peer_are_replaced() -> None:
    spoof = [(b"host", b"front"), (b"x-forwarded-for", b"6.6.6.6"),
             (b"forwarded", b"for=6.6.6.6"), (b"x-real-ip", b"6.6.6.6"),
             (b"x-forwarded-host", b"evil"), (b"x-forwarded-proto", b"https")]
    out = dict(request_headers(spoof, CONFIG, peer="10.0.0.7", scheme="http"))
    assert out[b"x-forwarded-for"] == b"10.0.0.7"
    assert out[b"x-forwarded-proto"] == b"http"
    assert out[b"x-forwarded-host"] == b"front"
    assert out[b"forwarded"] == b"for=10.0.0.7;host=front;proto=http"
    assert b"x-real-ip" not in out


def test_forwarding_headers_from_a_trusted_peer_are_appended_to() -> None:
    trusting = ProxyConfig.build("http://up.example", trusted_proxies=["10.0.0.0/8"])
    inbound = [(b"host", b"front"), (b"x-forwarded-for", b"203.0.113.9"),
               (b"forwarded", b"for=203.0.113.9"), (b"x-forwarded-proto", b"https")]
    out = dict(request_headers(inbound, trusting, peer="10.0.0.7", scheme="http"))
    assert out[b"x-forwarded-for"] == b"203.0.113.9, 10.0.0.7"
    assert out[b"forwarded"] == b"for=203.0.113.9, for=10.0.0.7;host=front;proto=http"
    assert out[b"x-forwarded-proto"] == b"https"


@pytest.mark.parametrize("fields", [1, 4, 5, 12])
@pytest.mark.parametrize("bad", [b"\r", b"\n", b"\x00"])
def test_cr_lf_nul_in_any_request_value_is_400(fields: int, bad: bytes) -> None:
    """Whether the values are searched one by one (a few) or joined (many)."""
    for where in range(fields):
        headers = [(b"host", b"front")] + [(b"x-%d" % i, b"v") for i in range(fields - 1)]
        headers[where] = (headers[where][0], b"a" + bad + b"b")
        with pytest.raises(BadRequest):
            plan_request(CONFIG, IncomingRequest("GET", b"/api/x", headers, "10.0.0.1"))
    fine = [(b"host", b"front")] + [(b"x-%d" % i, b"v\tw") for i in range(fields - 1)]
    plan_request(CONFIG, IncomingRequest("GET", b"/api/x", fine, "10.0.0.1"))


def test_forwarding_memo_keeps_the_recent_clients() -> None:
    """An untrusted peer's forwarding fields are made once a (peer, scheme, host) and
    kept least-recently-used: a new client is remembered after the memo filled, and
    the one unused longest is forgotten, not the newcomer."""
    memo = headers_module._untrusted_forwarding
    memo.cache_clear()
    limit = memo.cache_info().maxsize
    assert limit is not None

    def forwarding(peer: str) -> list[tuple[bytes, bytes]]:
        out = request_headers([(b"host", b"front")], CONFIG, peer=peer, scheme="http")
        return [field for field in out if field[0] != b"host"]

    first = forwarding("10.9.0.0")
    for i in range(1, limit + 1):
        forwarding(f"10.9.{i // 250}.{i % 250}")
    assert memo.cache_info().currsize == limit  # full, the first client pushed out
    newcomer = forwarding("192.0.2.1")
    hits = memo.cache_info().hits
    assert forwarding("192.0.2.1") == newcomer  # kept though the memo was full
    assert memo.cache_info().hits == hits + 1
    assert forwarding("10.9.0.0") == first  # made again, the same fields
    assert memo.cache_info().hits == hits + 1
    assert (b"x-forwarded-for", b"192.0.2.1") in newcomer


def test_ipv6_peer_is_quoted_in_forwarded() -> None:
    out = dict(request_headers([], CONFIG, peer="::1", scheme="http"))
    assert out[b"forwarded"].startswith(b'for="[::1]"')


_header_name = st.sampled_from(
    sorted(HOP_BY_HOP | {b"x-a", b"x-b", b"x-forwarded-for", b"forwarded", b"x-real-ip",
                         b"authorization", b"cookie", b"x-forwarded-host"}))
_header_value = st.sampled_from([b"1", b"6.6.6.6", b"for=6.6.6.6", b"x-a", b"x-b, authorization"])


@given(st.lists(st.tuples(_header_name, _header_value), max_size=15),
       st.lists(st.sampled_from([b"x-a", b"x-b", b"authorization", b"cookie"]), max_size=3))
def test_header_policy_properties(headers: list[tuple[bytes, bytes]], named: list[bytes]) -> None:
    if named:
        headers = [*headers, (b"connection", b", ".join(named))]
    out = request_headers(headers, CONFIG, peer="10.0.0.7", scheme="http")
    got = names(out)
    # No hop-by-hop header survives, except the one `te: trailers` the policy allows.
    assert all(n not in HOP_BY_HOP or (n, v) == (b"te", b"trailers") for n, v in out)
    # Every Connection-named header is gone.
    connection_named = {t.strip() for n, v in headers if n == b"connection"
                        for t in v.split(b",")}
    assert not (connection_named - {b""}) & set(got)
    # Forwarding headers carry only the real peer: no untrusted client value.
    values = dict(out)
    assert values[b"x-forwarded-for"] == b"10.0.0.7"
    assert b"6.6.6.6" not in values[b"forwarded"]
    assert b"x-real-ip" not in got


# -- response headers ----------------------------------------------------------


def test_response_hop_by_hop_and_named_are_stripped_and_duplicates_kept() -> None:
    upstream = [(b"connection", b"x-internal"), (b"x-internal", b"1"),
                (b"transfer-encoding", b"chunked"), (b"set-cookie", b"a=1"),
                (b"set-cookie", b"b=2"), (b"keep-alive", b"timeout=5"), (b"date", b"x"),
                (b"server", b"up")]
    out = response_headers(upstream, CONFIG, mount=b"/api")
    assert out == [(b"set-cookie", b"a=1"), (b"set-cookie", b"b=2")]


@pytest.mark.parametrize(("location", "expected"), [
    (b"http://up.example:8080/base/next?x=1", b"/api/next?x=1"),
    (b"http://up.example:8080/base", b"/api"),
    (b"/base/next", b"/api/next"),
    (b"/basement", b"/basement"),
    (b"http://other.example/base/next", b"http://other.example/base/next"),
])
def test_location_pointing_at_the_base_is_rewritten(location: bytes, expected: bytes) -> None:
    out = response_headers([(b"location", location)], CONFIG, mount=b"/api")
    assert out == [(b"location", expected)]


def test_refresh_and_cookie_path_rewriting() -> None:
    cfg = ProxyConfig.build("http://up.example:8080/base", mount="/api",
                            rewrite_cookie_path=True, cookie_domain="")
    out = response_headers([
        (b"refresh", b"5; url=http://up.example:8080/base/x"),
        (b"set-cookie", b"s=1; Path=/base/app; Domain=up.example; HttpOnly"),
    ], cfg, mount=b"/api")
    assert out == [(b"refresh", b"5; url=/api/x"), (b"set-cookie", b"s=1; Path=/api/app; HttpOnly")]


@pytest.mark.parametrize("upstream", [
    [(b"content-length", b"5"), (b"transfer-encoding", b"chunked")],
    [(b"content-length", b"5"), (b"content-length", b"6")],
])
def test_ambiguous_upstream_framing_is_502(upstream: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(BadGateway):
        response_headers(upstream, CONFIG, mount=b"")


# -- plans ---------------------------------------------------------------------


def test_plan_framing_follows_the_client() -> None:
    plan = plan_request(CONFIG, incoming(headers=[(b"content-length", b"5")], method="POST"))
    assert plan.content_length == 5 and plan.has_body
    assert (b"content-length", b"5") in plan.headers
    assert b"transfer-encoding" not in names(plan.headers)
    plan = plan_request(CONFIG, incoming(headers=[(b"transfer-encoding", b"chunked")],
                                         method="POST"))
    assert plan.has_body and plan.content_length is None
    assert (b"transfer-encoding", b"chunked") in plan.headers
    plan = plan_request(CONFIG, incoming(method="POST"))
    assert not plan.has_body
    assert not {b"content-length", b"transfer-encoding"} & set(names(plan.headers))


@pytest.mark.parametrize("headers", [
    [(b"content-length", b"5"), (b"transfer-encoding", b"chunked")],
    [(b"transfer-encoding", b"gzip, chunked")],
    [(b"transfer-encoding", b"chunked, chunked")],
    [(b"content-length", b"+5")],
    [(b"content-length", b"0x10")],
    [(b"content-length", b"1, 2")],
    [(b"content-length", b"1"), (b"content-length", b"2")],
])
def test_smuggling_framing_is_refused(headers: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(BadRequest):
        plan_request(CONFIG, incoming(headers=headers, method="POST"))


def test_host_is_required_on_http11_only() -> None:
    no_host = [(b"x-a", b"1")]
    with pytest.raises(BadRequest):
        plan_request(CONFIG, IncomingRequest("GET", b"/api/x", no_host, "10.0.0.7"))
    plan = plan_request(CONFIG, IncomingRequest("GET", b"/api/x", no_host, "10.0.0.7",
                                                http_version="1.0"))
    assert plan.headers[0] == (b"host", b"up.example:8080")


def test_header_limits_are_431() -> None:
    with pytest.raises(HeadersTooLarge):
        plan_request(CONFIG, incoming(headers=[(b"x-a", b"1")] * 101))
    with pytest.raises(HeadersTooLarge):
        plan_request(CONFIG, incoming(headers=[(b"x-a", b"a" * 40000)]))


def test_declared_length_over_the_limit_is_413_before_any_byte() -> None:
    cfg = ProxyConfig.build("http://up.example", max_body_size=10)
    with pytest.raises(BodyTooLarge):
        plan_request(cfg, incoming(b"/x", [(b"content-length", b"11")], "POST"))


def test_body_counter_counts_chunked_streams() -> None:
    cfg = ProxyConfig.build("http://up.example", max_body_size=10)
    plan = plan_request(cfg, incoming(b"/x", [(b"transfer-encoding", b"chunked")], "POST"))
    counter = BodyCounter(plan, cfg)
    counter.feed(10)
    with pytest.raises(BodyTooLarge):
        counter.feed(1)
    plan = plan_request(cfg, incoming(b"/x", [(b"content-length", b"4")], "POST"))
    counter = BodyCounter(plan, cfg)
    counter.feed(3)
    with pytest.raises(IncompleteBody):
        counter.finish()


def test_response_plan_drops_length_on_204_and_304() -> None:
    plan = plan_request(ROOT, incoming(b"/x"))
    head = plan_response(ROOT, plan, 304, [(b"content-length", b"10"), (b"etag", b"x")])
    assert head.headers == [(b"etag", b"x")] and not head.has_body
    head = plan_response(ROOT, plan, 200, [(b"content-length", b"10")])
    assert head.has_body and head.status_line == "200 OK"


@pytest.mark.parametrize(("upstream", "expected"), [
    ([(b"content-length", b"5, 5")], [(b"content-length", b"5")]),
    ([(b"content-length", b"5"), (b"content-length", b" 5")], [(b"content-length", b"5")]),
    ([(b"content-length", b"5, 6")], BadGateway),
    ([(b"content-length", b"5"), (b"content-length", b"6")], BadGateway),
    ([(b"content-length", b"+5")], BadGateway),
    ([(b"content-length", b"0x10")], BadGateway),
    ([(b"content-length", b"5"), (b"transfer-encoding", b"chunked")], BadGateway),
    ([(b"transfer-encoding", b"gzip, chunked")], BadGateway),
    ([(b"transfer-encoding", b"chunked")], []),
], ids=["equal-list", "equal-lines", "differing-list", "differing-lines", "plus", "hex",
        "both", "gzip-chunked", "chunked"])
def test_response_framing_rules(upstream: list[tuple[bytes, bytes]],
                                expected: list[tuple[bytes, bytes]] | type[Exception]) -> None:
    """RFC 9112 6.3 / RFC 9110 8.6: one length or chunked alone; anything else is a 502."""
    if isinstance(expected, list):
        assert response_headers(upstream, CONFIG, mount=b"/api") == expected
    else:
        with pytest.raises(expected):
            response_headers(upstream, CONFIG, mount=b"/api")


@pytest.mark.parametrize("status", [100, 101, 103])
def test_interim_status_reaching_the_core_is_502(status: int) -> None:
    """Interim answers are skipped below the core; one that arrives (an unasked 101) is a 502."""
    plan = plan_request(ROOT, incoming(b"/x"))
    with pytest.raises(BadGateway):
        plan_response(ROOT, plan, status, [(b"upgrade", b"h2c")])


def test_http09_request_is_refused() -> None:
    with pytest.raises(BadRequest):
        plan_request(CONFIG, IncomingRequest("GET", b"/api/x", [], "10.0.0.7",
                                             http_version="0.9"))


def test_build_request_sends_exactly_the_plan() -> None:
    plan = plan_request(CONFIG, incoming(b"/api/a%2F../b?x&y=", method="POST"))
    request = build_request(CONFIG, plan, None)
    assert request.extensions["target"] == b"/base/a%2F../b?x&y="
    assert request.headers.raw == plan.headers
    assert "user-agent" not in request.headers and "content-length" not in request.headers


def test_build_request_streams_the_body_as_given_without_framing_headers() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"ab"
        yield b"c"

    async def read_async(request: httpx.Request) -> list[bytes]:
        assert isinstance(request.stream, httpx.AsyncByteStream)
        return [piece async for piece in request.stream]

    chunked = [(b"transfer-encoding", b"chunked")]
    plan = plan_request(CONFIG, incoming(b"/api/up", chunked, method="POST"))
    request = build_request(CONFIG, plan, chunks())
    assert asyncio.run(read_async(request)) == [b"ab", b"c"]
    assert request.headers.raw == plan.headers  # nothing added, nothing merged
    length = [(b"content-length", b"3")]
    plan = plan_request(CONFIG, incoming(b"/api/up", length, method="PUT"))
    request = build_request(CONFIG, plan, iter([b"ab", b"c"]))
    assert isinstance(request.stream, httpx.SyncByteStream)
    assert list(request.stream) == [b"ab", b"c"]
    assert [n for n, _ in request.headers.raw].count(b"content-length") == 1
    plan = plan_request(CONFIG, incoming(b"/api/none", method="DELETE"))
    empty = build_request(CONFIG, plan, None)
    assert list(empty.stream) == [] and asyncio.run(read_async(empty)) == []
    assert "content-length" not in empty.headers and "transfer-encoding" not in empty.headers


def test_build_request_through_a_transport_keeps_the_raw_target() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200)

    plan = plan_request(CONFIG, incoming(b"/api/a/%2e%2e/b"))
    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        client.send(build_request(CONFIG, plan, None))
    assert seen[0].extensions["target"] == b"/base/a/%2e%2e/b"


@pytest.mark.parametrize(("exc", "expected"), [
    (httpx.ConnectError("refused"), BadGateway),
    (httpx.ConnectTimeout("slow"), GatewayTimeout),
    (httpx.ReadTimeout("slow"), GatewayTimeout),
    (httpx.PoolTimeout("full"), ServiceUnavailable),
    (httpx.RemoteProtocolError("garbage"), BadGateway),
    (httpx.ReadError("reset"), BadGateway),
])
def test_one_exception_map(exc: Exception, expected: type[Exception]) -> None:
    with pytest.raises(expected) as info, map_upstream_errors():
        raise exc
    doc = json.loads(info.value.body())  # type: ignore[attr-defined]
    assert doc["status"] == info.value.status  # type: ignore[attr-defined]
    assert set(doc) == {"type", "title", "status", "detail"}


def test_discard_budget_after_the_upload_began() -> None:
    """Modest unread rests are swallowed before an answer that keeps the connection;
    closing answers and big rests are left to the server; nothing left: None."""
    from dualproxy.core import DISCARD_BODY_LIMIT, discard_budget

    plan = plan_request(ROOT, incoming(b"/x", [(b"content-length", b"1000")], "POST"))
    counter = BodyCounter(plan, ROOT)
    counter.feed(400)
    assert discard_budget(counter, False) == 600
    assert discard_budget(counter, True) == 0
    counter.feed(600)
    assert discard_budget(counter, False) is None
    big = plan_request(ROOT, incoming(b"/x", [(b"content-length", b"%d" % (2 << 20))], "POST"))
    assert discard_budget(BodyCounter(big, ROOT), False) == 0
    chunked = plan_request(ROOT, incoming(b"/x", [(b"transfer-encoding", b"chunked")], "POST"))
    assert discard_budget(BodyCounter(chunked, ROOT), False) == DISCARD_BODY_LIMIT


@pytest.mark.parametrize("headers,closing,expected", [
    ([], False, None),                                                    # no body
    ([(b"content-length", b"0")], False, 0),                              # an empty one
    ([(b"content-length", b"300")], False, 300),
    ([(b"content-length", b"300")], True, 0),                             # the answer closes
    ([(b"content-length", b"%d" % (2 << 20))], False, 0),                 # past the limit
    ([(b"transfer-encoding", b"chunked")], False, 1 << 20),               # up to the limit
    ([(b"content-length", b"300"), (b"expect", b"100-continue")], False, 0),  # RFC 9110 10.1.1
    ([(b"content-length", b"3"), (b"transfer-encoding", b"chunked")], False, 0),  # refused framing
])
def test_early_discard_before_the_upload(headers: list[tuple[bytes, bytes]], closing: bool,
                                         expected: int | None) -> None:
    from dualproxy.core import early_discard
    from dualproxy.framing import FramingError, parse_framing

    request = incoming(b"/x", headers, "POST")
    assert early_discard(request, closing) == expected
    try:
        framing = parse_framing(request.headers)
    except FramingError:
        return  # a refusal: no checked framing to hand in
    # The checked request's framing handed in (a filter's answer) decides the same.
    assert early_discard(request, closing, (framing.length, framing.chunked)) == expected
