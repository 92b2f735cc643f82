"""The wire rule (wire.py): nothing unwritable reaches the wire, whoever produced it.

Property tests hold the rule's two forms (field by field, and on the serialised
head the HTTP/1.1 client checks) to one answer, and hold every head the rule
accepts to one request for a strict parser (h11). Then, on every pairing, the
hooks users write (tests/hook_serve.py: a percent-decoded cookie copied into a
header, a target taken from a header, a response header echoed) are fed CRLF:
a 502 naming the hook in the log, and nothing smuggled upstream.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
from collections.abc import Iterator
from typing import Any

import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dualproxy.config import ProxyConfig
from dualproxy.core import IncomingRequest, ResponseHead, UpstreamPlan, plan_request
from dualproxy.errors import InvalidHead, map_upstream_errors
from dualproxy.filters import Chain, Exchange
from dualproxy.filters.chain import run_sync
from dualproxy.filters.hooked import hook_filters
from dualproxy.http1 import ClientConnection, LocalProtocolError
from dualproxy.logs import RequestRecord
from dualproxy.wire import WireError, head_problem, serialised_head_ok
from tests.conftest import ProxyProcess
from tests.rawhttp import exchange, request_bytes, wait_until
from tests.upstream import Upstream

TOKEN_CHARS = "!#$%&'*+.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-"
tokens = st.text(TOKEN_CHARS, min_size=1, max_size=12).map(str.encode)
# Bytes anywhere in a name, value or target, biased to what splits or cuts a line.
any_bytes = st.lists(st.one_of(st.sampled_from(b"\r\n\x00 \t:;\x7f\x80\xff"),
                               st.integers(0, 255)), max_size=16).map(bytes)
names = st.one_of(tokens, any_bytes)
values = st.one_of(st.binary(max_size=16).filter(lambda v: not re.search(rb"[\x00\r\n]", v)),
                   any_bytes)
targets = st.one_of(st.text("/abc%?=&;", min_size=1, max_size=12).map(str.encode), any_bytes)
fields = st.lists(st.tuples(names, values), max_size=6)


@given(tokens, targets, fields)
def test_the_serialised_check_agrees_with_the_field_by_field_rule(
        method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    head = (method + b" " + target + b" HTTP/1.1\r\n"
            + b"".join(name + b": " + value + b"\r\n" for name, value in headers) + b"\r\n")
    assert serialised_head_ok(head, headers) == (head_problem(target, headers, method)
                                                 is None)


@given(targets, fields)
def test_a_head_the_rule_accepts_is_one_request_with_those_fields(
        target: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    """The rule's promise: an accepted head cannot split into two requests, nor
    change a field. h11 (strict) reads exactly the request that was meant."""
    wanted = [(b"host", b"u"), *headers]
    try:
        head = ClientConnection().send_request(b"GET", target, wanted)
    except LocalProtocolError as exc:
        assert isinstance(exc.__cause__, WireError) or "Content-Length" in str(exc) \
            or "Transfer-Encoding" in str(exc) or "transfer coding" in str(exc)
        return
    server = h11.Connection(h11.SERVER)
    server.receive_data(head + b"GET /second HTTP/1.1\r\nhost: u\r\n\r\n")
    try:
        request = server.next_event()
    except h11.RemoteProtocolError:
        # h11 refuses a few things the wire rule leaves to the upstream (leading or
        # trailing whitespace, other controls in a value; framing); never a split.
        assert any(re.search(rb"^[ \t]|[ \t]$|[\x01-\x08\x0b-\x1f\x7f]", v)
                   for _, v in headers) or any(n.lower() in (b"content-length",
                                                             b"transfer-encoding")
                                               for n, _ in headers)
        return
    assert isinstance(request, h11.Request)
    assert request.target == target
    # (whitespace around a value is OWS: no parser keeps it)
    assert [(n.lower(), v) for n, v in request.headers] == [(n.lower(), v.strip(b" \t"))
                                                            for n, v in wanted]


@pytest.mark.parametrize(("target", "headers", "what"), [
    (b"/x", [(b"x-user", b"bob\r\nContent-Length: 0")], "header"),
    (b"/x", [(b"x-user", b"bob\nx: y")], "header"),
    (b"/x", [(b"x-user", b"bob\rx")], "header"),
    (b"/x", [(b"x-user", b"bob\x00")], "header"),
    (b"/x", [(b"x user", b"bob")], "header"),
    (b"/x", [(b"x-user:", b"bob")], "header"),
    (b"/x", [(b"", b"bob")], "header"),
    (b"/x HTTP/1.1\r\nHost: x\r\n\r\nGET /y", [], "target"),
    (b"/caf\xc3\xa9", [], "target"),
    (b"", [], "target"),
])
def test_the_client_writes_no_unwritable_head(target: bytes, headers: list[tuple[bytes, bytes]],
                                              what: str) -> None:
    conn = ClientConnection()
    with pytest.raises(LocalProtocolError) as info:
        conn.send_request(b"GET", target, [(b"host", b"u"), *headers])
    assert isinstance(info.value.__cause__, WireError) and info.value.__cause__.what == what
    assert not conn.reusable
    with pytest.raises(InvalidHead) as mapped, map_upstream_errors():
        raise info.value
    assert mapped.value.status == 502
    assert mapped.value.detail == f"the proxy produced an invalid {what}"


def test_other_controls_and_obs_text_pass_as_nginx_passes_them() -> None:
    head = ClientConnection().send_request(b"GET", b"/x", [(b"host", b"u"),
                                                          (b"x-a", b"\x01\x7f\xe9 \t")])
    assert b"x-a: \x01\x7f\xe9 \t\r\n" in head


CONFIG = ProxyConfig.build("http://127.0.0.1:9")
INCOMING = IncomingRequest("GET", b"/x", [(b"host", b"front")], "127.0.0.1")


def run_request_hooks(hooks: list[Any], plan: UpstreamPlan) -> UpstreamPlan:
    """The hooks as the faces run them: filters of the route's chain."""
    exchange = Exchange(plan.incoming, RequestRecord(plan.incoming))
    exchange.plan = plan
    run_sync(Chain(hook_filters(hooks, [])).request(exchange))
    assert exchange.plan is not None
    return exchange.plan


def run_response_hooks(hooks: list[Any], plan: UpstreamPlan,
                       head: ResponseHead) -> ResponseHead:
    exchange = Exchange(plan.incoming, RequestRecord(plan.incoming))
    exchange.plan = plan
    return run_sync(Chain(hook_filters([], hooks)).response(exchange, head))


def add_in_place(plan: object) -> None:
    plan.headers.append((b"x-user", b"a\r\nb: c"))  # type: ignore[attr-defined]


def bad_response_value(plan: object, head: ResponseHead) -> ResponseHead:
    return ResponseHead(head.status, [(b"x-a", b"1\r\nSet-Cookie: admin=1")], head.has_body)


def test_a_hook_that_changes_the_plan_in_place_is_checked_too() -> None:
    with pytest.raises(InvalidHead) as info:
        run_request_hooks([add_in_place], plan_request(CONFIG, INCOMING))
    assert info.value.status == 502
    assert info.value.detail == "the proxy's own hook produced an invalid header"
    assert info.value.log_detail is not None and "add_in_place" in info.value.log_detail


def test_a_response_hook_is_checked() -> None:
    plan = plan_request(CONFIG, INCOMING)
    with pytest.raises(InvalidHead, match="own hook produced an invalid header") as info:
        run_response_hooks([bad_response_value], plan, ResponseHead(200, [], True))
    assert "bad_response_value" in (info.value.log_detail or "")


# -- every pairing: the hooks of tests/hook_serve.py -----------------------------------------


class HookedProxy(ProxyProcess):
    module = "tests.hook_serve"


@pytest.fixture(scope="module")
def hooked(pairing: str, upstream: Upstream) -> Iterator[HookedProxy]:
    proxy = HookedProxy(pairing, upstream.url + "/base", ())
    yield proxy
    proxy.stop()


def smuggled(rid: str) -> str:
    """A request for the upstream, percent-encoded as a cookie or header value carries it."""
    return (f"%0d%0aContent-Length:%200%0d%0a%0d%0aGET%20/smuggled-{rid}%20HTTP/1.1%0d%0a"
            f"Host:%20x%0d%0ax-req-id:%20{rid}-smuggled%0d%0a%0d%0a")


def nothing_reached_the_upstream(upstream: Upstream, proxy: HookedProxy, rid: str) -> bool:
    """After a sentinel request went through: no record of `rid`'s request nor of its
    smuggled twin (a smuggled request on a pipelining upstream comes right behind)."""
    sentinel = rid + "-sentinel"
    response = exchange(proxy.port, request_bytes("GET", f"/after/{rid}",
                                                  [("x-req-id", sentinel)]))
    assert response.status == 200
    upstream.wait_record(sentinel)
    return upstream.find(rid) is None and not [
        r for r in upstream.records if f"smuggled-{rid}".encode() in r.target]


def refused_by_hook(proxy: HookedProxy, rid: str, raw: bytes, hook: str, what: str) -> None:
    response = exchange(proxy.port, raw)
    assert response.status == 502, response
    assert response.header("content-type") == "application/problem+json"
    assert f"the proxy's own hook produced an invalid {what}" in response.body.decode()
    assert wait_until(lambda: any(rid in line and hook in line
                                  for line in proxy.log().splitlines()))
    assert sum(rid in line and hook in line for line in proxy.log().splitlines()) == 1


def test_a_hook_copying_a_decoded_cookie_smuggles_nothing(hooked: HookedProxy,
                                                          upstream: Upstream, rid: str) -> None:
    """The issue's repro: `user=bob%0d%0aContent-Length: 0 ...` copied into X-User."""
    ok = exchange(hooked.port, request_bytes("GET", f"/hooked/{rid}-ok", [
        ("Cookie", "user=bob%20smith"), ("x-req-id", rid + "-ok")]))
    assert ok.status == 200
    assert upstream.wait_record(rid + "-ok").header("x-user") == "bob smith"  # hooks run
    raw = request_bytes("GET", f"/hooked/{rid}", [("Cookie", "user=bob" + smuggled(rid)),
                                                  ("x-req-id", rid)])
    refused_by_hook(hooked, rid, raw, "cookie_to_user", "header")
    assert nothing_reached_the_upstream(upstream, hooked, rid)


def test_a_hook_setting_a_decoded_target_smuggles_nothing(hooked: HookedProxy,
                                                          upstream: Upstream, rid: str) -> None:
    raw = request_bytes("GET", f"/routed/{rid}", [
        ("X-Route-To", f"/base/{rid}%20HTTP/1.1" + smuggled(rid)), ("x-req-id", rid)])
    refused_by_hook(hooked, rid, raw, "target_from_header", "target")
    assert nothing_reached_the_upstream(upstream, hooked, rid)


def test_a_response_hook_splits_no_response(hooked: HookedProxy, rid: str) -> None:
    raw = request_bytes("GET", f"/echoed/{rid}", [("X-Echo", "a%0d%0aSet-Cookie:%20admin=1"),
                                                  ("x-req-id", rid)])
    response = exchange(hooked.port, raw)
    assert response.status == 502
    assert response.header("set-cookie") is None and response.header("x-echo") is None
    assert "the proxy's own hook produced an invalid header" in response.body.decode()
    assert sum(rid in line and "echo_down" in line for line in hooked.log().splitlines()) == 1


@pytest.mark.parametrize("added", ["content-length:3", "Content-Length:99999",
                                   "transfer-encoding:chunked", "transfer-encoding:gzip"])
def test_a_response_hook_changes_no_framing(hooked: HookedProxy, rid: str, added: str) -> None:
    """A second Content-Length, or a Transfer-Encoding beside one, was written as given:
    gunicorn sent 3 bytes of `content-length: 172` + `content-length: 3` and kept the
    connection, uvicorn chunked a body announced with a Content-Length: whoever reads
    the first length takes the next response for this one's body."""
    ok = exchange(hooked.port, request_bytes("GET", f"/framed/{rid}-ok", [
        ("X-Set-Header", "x-debug:1"), ("x-req-id", rid + "-ok")]))
    assert ok.status == 200 and ok.header("x-debug") == "1"  # the hook runs
    response = exchange(hooked.port, request_bytes("GET", f"/framed/{rid}", [
        ("X-Set-Header", added), ("x-req-id", rid)]))
    assert response.status == 502, response
    assert response.header("transfer-encoding") is None
    assert "the proxy's own hook produced an invalid header" in response.body.decode()
    assert wait_until(lambda: any(rid in line and "header_down" in line
                                  for line in hooked.log().splitlines()))


def test_a_websocket_handshake_through_the_hook_smuggles_nothing(
        hooked: HookedProxy, upstream: Upstream, rid: str) -> None:
    raw = request_bytes("GET", f"/ws/{rid}", [
        ("Upgrade", "websocket"), ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Sec-WebSocket-Version", "13"),
        ("Cookie", "user=bob" + smuggled(rid)), ("x-req-id", rid)])
    refused_by_hook(hooked, rid, raw, "cookie_to_user", "header")
    assert nothing_reached_the_upstream(upstream, hooked, rid)


def test_the_problem_line_names_the_hook(caplog: pytest.LogCaptureFixture) -> None:
    """What the 502's log line says (the face's `refuse`, one line per request)."""
    from dualproxy.logs import AccessLog

    record = AccessLog(enabled=False).start(INCOMING)
    with caplog.at_level(logging.WARNING, "dualproxy"):
        try:
            run_request_hooks([add_in_place], plan_request(CONFIG, INCOMING))
        except InvalidHead as exc:
            AccessLog(enabled=False).problem(record, exc)
    assert [r.getMessage() for r in caplog.records if "add_in_place" in r.getMessage()]


class Listener:
    """A TCP listener that records every byte it is sent (and answers nothing)."""

    def __init__(self) -> None:
        self.received = b""
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(5)
            try:
                while piece := conn.recv(65536):
                    self.received += piece
            except OSError:
                pass


@pytest.mark.parametrize("tunnel", [False, True])
def test_both_handshakes_check_the_head_they_write(tunnel: bool) -> None:
    """The last step of each WebSocket face, with no hook in between: the plan itself
    carries the bad value. Neither `websockets` nor the tunnel's codec writes it."""
    import asyncio

    from dualproxy.websocket.handshake import plan_handshake, upgrade_plan
    from dualproxy.websocket.relay_async import open_upstream
    from dualproxy.websocket.tunnel import open_upstream as open_tunnel

    listener = Listener()
    config = ProxyConfig.build(listener.url)
    incoming = IncomingRequest("GET", b"/ws", [
        (b"host", b"front"), (b"upgrade", b"websocket"), (b"connection", b"Upgrade"),
        (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
        (b"sec-websocket-version", b"13")], "127.0.0.1")
    plan = plan_handshake(config, incoming)
    plan.headers.append((b"x-user", b"bob\r\nContent-Length: 0"))
    ws = upgrade_plan(config, plan, tunnel=tunnel)
    if tunnel:
        with pytest.raises(InvalidHead), map_upstream_errors():
            open_tunnel(ws, config, config.upstreams[0])
    else:
        with pytest.raises(InvalidHead):
            asyncio.run(open_upstream(config, ws))
    listener.thread.join(10)  # the proxy side closed: everything it sent is in
    assert not listener.thread.is_alive()
    listener.sock.close()
    assert b"bob" not in listener.received
