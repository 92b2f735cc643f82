"""Unit tests of the pure WebSocket handshake plan (dualproxy.websocket.handshake)."""

from __future__ import annotations

import pytest

from dualproxy.config import ProxyConfig
from dualproxy.core import IncomingRequest, plan_response
from dualproxy.errors import BadGateway, BadRequest, NotProxied
from dualproxy.websocket.handshake import (
    accept_head,
    check_handshake,
    chosen_subprotocol,
    is_websocket_request,
    library_request_headers,
    plan_handshake,
    upgrade_plan,
)

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="


def handshake(target: bytes = b"/ws/a%2Fb?x=1&y=", *extra: tuple[bytes, bytes],
              method: str = "GET") -> IncomingRequest:
    headers = [
        (b"host", b"front.example"),
        (b"upgrade", b"websocket"),
        (b"connection", b"keep-alive, Upgrade"),
        (b"sec-websocket-key", KEY),
        (b"sec-websocket-version", b"13"),
        (b"cookie", b"a=1"),
        (b"authorization", b"Bearer t"),
        (b"origin", b"http://front.example"),
        (b"sec-websocket-protocol", b"chat, superchat"),
        (b"sec-websocket-extensions", b"permessage-deflate"),
        (b"x-custom", b"1"),
        (b"x-forwarded-for", b"6.6.6.6"),
        (b"keep-alive", b"timeout=5"),
        *extra,
    ]
    return IncomingRequest(method=method, target=target, headers=headers, peer="10.0.0.7")


CONFIG = ProxyConfig.build("http://up.example:9000/base", mount="/ws")


def names(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [n for n, _ in headers]


def test_target_and_mount_rule_are_the_cores() -> None:
    ws = upgrade_plan(CONFIG, plan_handshake(CONFIG, handshake()), tunnel=False)
    assert ws.target == b"/base/a%2Fb?x=1&y="
    assert ws.url == "ws://up.example:9000/base/a%2Fb?x=1&y="
    with pytest.raises(NotProxied):
        plan_handshake(CONFIG, handshake(b"/wsx/a"))
    with pytest.raises(BadRequest):
        plan_handshake(CONFIG, handshake(b"/ws/../../etc"))
    secure = ProxyConfig.build("https://up.example")
    assert upgrade_plan(secure, plan_handshake(secure, handshake(b"/x")),
                        tunnel=False).url == "wss://up.example/x"


def test_regenerated_per_hop_keeps_policy_headers_and_drops_handshake_ones() -> None:
    ws = upgrade_plan(CONFIG, plan_handshake(CONFIG, handshake()), tunnel=False)
    headers = dict(ws.headers)
    assert ws.headers[0] == (b"host", b"up.example:9000")
    for name in (b"cookie", b"authorization", b"origin", b"x-custom"):
        assert name in headers
    assert headers[b"x-forwarded-for"] == b"10.0.0.7"  # untrusted peer: its XFF dropped
    assert b"for=10.0.0.7" in headers[b"forwarded"]
    for name in (b"upgrade", b"connection", b"keep-alive", b"sec-websocket-key",
                 b"sec-websocket-version", b"sec-websocket-protocol",
                 b"sec-websocket-extensions"):
        assert name not in headers
    assert ws.subprotocols == ["chat", "superchat"]
    generated = [(b"Host", b"ignored"), (b"Upgrade", b"websocket"),
                 (b"Connection", b"Upgrade"), (b"Sec-WebSocket-Key", b"k"),
                 (b"Sec-WebSocket-Version", b"13"), (b"User-Agent", b"lib")]
    merged = library_request_headers(ws, generated)
    assert names(merged).count(b"host") == 1
    assert b"user-agent" not in names(merged)
    assert (b"sec-websocket-key", b"k") in merged


def test_tunnel_passes_the_handshake_whole() -> None:
    ws = upgrade_plan(CONFIG, plan_handshake(CONFIG, handshake()), tunnel=True)
    headers = dict(ws.headers)
    assert headers[b"sec-websocket-key"] == KEY
    assert headers[b"sec-websocket-protocol"] == b"chat, superchat"
    assert headers[b"sec-websocket-extensions"] == b"permessage-deflate"
    assert headers[b"upgrade"] == b"websocket" and headers[b"connection"] == b"Upgrade"
    assert b"keep-alive" not in headers


def test_preserve_host() -> None:
    config = ProxyConfig.build("http://up.example:9000", preserve_host=True)
    ws = upgrade_plan(config, plan_handshake(config, handshake(b"/x")), tunnel=False)
    assert ws.headers[0] == (b"host", b"front.example")


@pytest.mark.parametrize("change", [
    {"method": "POST"},
    {"drop": b"upgrade"},
    {"drop": b"connection"},
    {"drop": b"sec-websocket-key"},
    {"set": (b"sec-websocket-key", b"short")},
    {"set": (b"sec-websocket-version", b"8")},
    {"set": (b"sec-websocket-protocol", b"a b")},
    {"add": (b"content-length", b"5")},
    {"add": (b"sec-websocket-key", KEY)},
])
def test_bad_handshakes_are_400(change: dict[str, object]) -> None:
    base = handshake(b"/ws/x", method=str(change.get("method", "GET")))
    headers = [h for h in base.headers if h[0] != change.get("drop")]
    replacement = change.get("set")
    if isinstance(replacement, tuple):
        headers = [replacement if n == replacement[0] else (n, v) for n, v in headers]
    added = change.get("add")
    if isinstance(added, tuple):
        headers.append(added)
    bad = IncomingRequest(method=base.method, target=base.target, headers=headers,
                          peer=base.peer)
    with pytest.raises(BadRequest) as info:
        check_handshake(bad)
    assert info.value.status == 400


def test_is_websocket_request() -> None:
    assert is_websocket_request([(b"upgrade", b"WebSocket")])
    assert not is_websocket_request([(b"upgrade", b"h2c")])
    assert not is_websocket_request([])


def test_response_side() -> None:
    upstream_101 = [(b"upgrade", b"websocket"), (b"connection", b"Upgrade"),
                    (b"sec-websocket-accept", b"acc"), (b"sec-websocket-protocol", b"chat"),
                    (b"set-cookie", b"s=1"), (b"set-cookie", b"t=2"), (b"server", b"up"),
                    (b"x-up", b"1")]
    per_hop = upgrade_plan(CONFIG, plan_handshake(CONFIG, handshake()), tunnel=False)
    head = accept_head(CONFIG, per_hop, 101, upstream_101)
    assert head.headers == [(b"set-cookie", b"s=1"), (b"set-cookie", b"t=2"), (b"x-up", b"1")]
    assert chosen_subprotocol(per_hop, upstream_101) == "chat"
    assert chosen_subprotocol(per_hop, []) is None
    with pytest.raises(BadGateway):
        chosen_subprotocol(per_hop, [(b"sec-websocket-protocol", b"other")])
    tunnel = upgrade_plan(CONFIG, plan_handshake(CONFIG, handshake()), tunnel=True)
    head = accept_head(CONFIG, tunnel, 101, upstream_101)
    assert head.status == 101 and not head.has_body
    assert names(head.headers) == [b"upgrade", b"connection", b"sec-websocket-accept",
                                   b"sec-websocket-protocol", b"set-cookie", b"set-cookie",
                                   b"x-up"]
    with pytest.raises(BadGateway):
        accept_head(CONFIG, tunnel, 200, [])
    # A refusal is an ordinary HTTP answer: the core's response plan.
    refusal = plan_response(CONFIG, per_hop.plan, 403,
                            [(b"content-length", b"6"), (b"x-why", b"no")])
    assert refusal.status == 403 and refusal.has_body


def test_an_asgi_server_checked_handshake_is_not_checked_again() -> None:
    # Over HTTP/2 (RFC 8441) the server validated an extended CONNECT: no Upgrade, no key.
    h2 = IncomingRequest(method="GET", target=b"/ws/x", http_version="2",
                         headers=[(b"sec-websocket-version", b"13")], peer="10.0.0.7")
    with pytest.raises(BadRequest):
        plan_handshake(CONFIG, h2)
    ws = upgrade_plan(CONFIG, plan_handshake(CONFIG, h2, server_checked=True), tunnel=False)
    assert ws.target == b"/base/x" and ws.headers[0] == (b"host", b"up.example:9000")
