"""The WebSocket handshake, both directions, for both faces (pure: no I/O).

Everything that decides what a proxied handshake looks like lives here. The
upstream request is the core's HTTP plan (`plan_request`: target, mount rule,
header policy), plus the handshake's own headers, which are either
*regenerated* per hop (the ASGI face: the `websockets` client makes its own key
and negotiates its own extensions) or *tunnelled* whole (the WSGI face relays
raw bytes after the 101, as nginx does, so both ends must agree on one key,
one extension set). The way back is `plan_response` for a refusal, and
`accept_head` for a 101.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..config import ProxyConfig
from ..core import IncomingRequest, ResponseHead, UpstreamPlan, attempt_headers, plan_request
from ..errors import BadGateway, BadRequest
from ..headers import Header, connection_tokens, response_headers
from ..upstreams import Upstream

# The handshake's own headers (RFC 6455 4.1, 11.3). Per hop, the client library
# writes them (key, version, offered extensions and subprotocols) and the front
# server answers them (accept, chosen extensions); tunnelled, they pass whole.
HANDSHAKE_HEADERS = frozenset({
    b"sec-websocket-key", b"sec-websocket-version", b"sec-websocket-extensions",
    b"sec-websocket-protocol", b"sec-websocket-accept",
})
# Upgrade and Connection are hop-by-hop for HTTP; a tunnel restores them.
UPGRADE_HEADERS: tuple[Header, ...] = ((b"upgrade", b"websocket"), (b"connection", b"Upgrade"))
_SCHEMES = {"http": "ws", "https": "wss", "unix": "ws"}
_ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 1.3
_TOKEN_CHARS = frozenset(b"!#$%&'*+-.^_`|~0123456789"
                         b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


@dataclass(frozen=True)
class WebSocketPlan:
    """The upstream handshake: where, with which headers, offering what."""

    url: str                  # ws(s)://authority + target (the connection's address)
    target: bytes             # byte-exact request-target, as for HTTP
    headers: list[Header]     # Host first; tunnel: the handshake headers included
    subprotocols: list[str]   # as the client offered them, in its order
    tunnel: bool
    plan: UpstreamPlan


def header_tokens(headers: Iterable[Header], name: bytes) -> list[bytes]:
    """The comma-separated tokens of every `name` line, lower-cased, in order."""
    return [token.strip().lower() for n, value in headers if n == name
            for token in value.split(b",") if token.strip()]


def is_websocket_request(headers: Iterable[Header]) -> bool:
    """Does the client ask to upgrade to WebSocket? (The WSGI face's dispatch test.)"""
    return b"websocket" in header_tokens(headers, b"upgrade")


def check_handshake(incoming: IncomingRequest) -> None:
    """Refuse (400) an opening handshake RFC 6455 4.2.1 calls invalid.

    ASGI servers check this before the app runs; a WSGI server does not, and a
    tunnel must never relay a half-valid upgrade.
    """
    headers = incoming.headers
    if incoming.method != "GET" or incoming.http_version != "1.1":
        raise BadRequest("a WebSocket handshake is an HTTP/1.1 GET")
    if not is_websocket_request(headers):
        raise BadRequest("missing Upgrade: websocket")
    if b"upgrade" not in connection_tokens(headers):
        raise BadRequest("missing Connection: Upgrade")
    keys = [value for name, value in headers if name == b"sec-websocket-key"]
    if len(keys) != 1 or not _valid_key(keys[0]):
        raise BadRequest("missing or invalid Sec-WebSocket-Key")
    if header_tokens(headers, b"sec-websocket-version") != [b"13"]:
        raise BadRequest("unsupported Sec-WebSocket-Version (13 is spoken)")
    if any(name in (b"content-length", b"transfer-encoding") and value.strip() != b"0"
           for name, value in headers):
        raise BadRequest("a WebSocket handshake carries no body")
    offered_subprotocols(headers)


def _valid_key(key: bytes) -> bool:
    try:
        return len(base64.b64decode(key.strip(), validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


def offered_subprotocols(headers: Iterable[Header]) -> list[str]:
    """The client's Sec-WebSocket-Protocol offer, in order (400 if not tokens)."""
    offered: list[str] = []
    for name, value in headers:
        if name != b"sec-websocket-protocol":
            continue
        for token in value.split(b","):
            token = token.strip()
            if not token or not set(token) <= _TOKEN_CHARS:
                raise BadRequest("invalid Sec-WebSocket-Protocol")
            offered.append(token.decode("ascii"))
    return offered


def plan_handshake(config: ProxyConfig, incoming: IncomingRequest, *,
                   server_checked: bool = False, routes: Sequence[bytes] = ()) -> UpstreamPlan:
    """The core's HTTP plan for a valid handshake (404 outside the mount, 400 ...).

    `server_checked`: an ASGI server has validated the handshake already (over
    HTTP/2, RFC 8441, it has no Upgrade or key headers to check). `routes`: as
    for `plan_request` (the router's mounts). The faces run
    their request hooks on the plan, then call `upgrade_plan`.
    """
    if not server_checked:
        check_handshake(incoming)
    return plan_request(config, incoming, routes)


def upgrade_plan(config: ProxyConfig, plan: UpstreamPlan, *, tunnel: bool,
                 upstream: Upstream | None = None) -> WebSocketPlan:
    """The upstream handshake for an HTTP plan, regenerated per hop or tunnelled,
    to `upstream` (the one chosen from the pool; default: the first)."""
    upstream = upstream or config.upstreams[0]
    own = [(n, v) for n, v in attempt_headers(config, plan, upstream)
           if n not in (b"content-length", b"transfer-encoding")]
    if tunnel:
        # request_headers kept the Sec-WebSocket-* lines (not hop-by-hop) in order.
        headers = [*own, *UPGRADE_HEADERS]
    else:
        headers = [(n, v) for n, v in own if n not in HANDSHAKE_HEADERS]
    scheme = _SCHEMES.get(upstream.scheme, "ws")
    url = f"{scheme}://{upstream.authority.decode('ascii')}{plan.target.decode('ascii')}"
    return WebSocketPlan(url=url, target=plan.target, headers=headers,
                         subprotocols=offered_subprotocols(plan.incoming.headers),
                         tunnel=tunnel, plan=plan)


def library_request_headers(plan: WebSocketPlan, generated: Iterable[Header]) -> list[Header]:
    """Our headers plus the handshake headers a client library generated for this hop.

    Everything else it wrote (Host, User-Agent, Origin) is dropped: the header
    policy decided those, and no header the client did not send is invented.
    """
    own = [(n.lower(), v) for n, v in generated
           if n.lower() in HANDSHAKE_HEADERS or n.lower() in (b"upgrade", b"connection")]
    return [*plan.headers, *own]


def accept_head(config: ProxyConfig, ws: WebSocketPlan, status: int,
                headers: Sequence[Header]) -> ResponseHead:
    """The head the client gets for the upstream's 101.

    Other headers (Set-Cookie ...) follow the HTTP response policy. Tunnelled,
    the handshake headers pass whole and Upgrade/Connection are restored; per
    hop, the front server writes its own, so they are left out here (the chosen
    subprotocol travels separately: `chosen_subprotocol`).
    """
    if status != 101:
        raise BadGateway(f"the upstream answered the WebSocket handshake with {status}")
    body_free = [(n, v) for n, v in headers if n not in (b"content-length", b"transfer-encoding")]
    out = response_headers(body_free, config, mount=ws.plan.mount)
    if ws.tunnel:
        out = [*UPGRADE_HEADERS, *out]
    else:
        out = [(n, v) for n, v in out if n not in HANDSHAKE_HEADERS]
    return ResponseHead(status=101, headers=out, has_body=False)


class BadUpgrade(BadGateway):
    """The upstream's 101 is not a WebSocket accept (RFC 6455 4.1): 502, and the
    client connection closes after it (bytes it sent on must not be read as HTTP)."""

    close_connection = True


def accept_key(key: bytes) -> bytes:
    """The Sec-WebSocket-Accept a server must answer to `key` (RFC 6455 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.strip() + _ACCEPT_GUID).digest())


def _extension_names(headers: Iterable[Header]) -> set[bytes]:
    return {item.split(b";", 1)[0].strip().lower() for name, value in headers
            if name == b"sec-websocket-extensions" for item in value.split(b",")
            if item.strip()}


def check_accept(request: Sequence[Header], response: Sequence[Header]) -> None:
    """Refuse (BadUpgrade) a 101 that RFC 6455 4.1 tells the client to fail.

    `request`: the handshake as sent upstream (its key and offers); `response`:
    the 101's headers, names lower-cased. Upgrade must be `websocket`,
    Connection must list `upgrade`, Sec-WebSocket-Accept must answer the key,
    and no extension or subprotocol may be one the request did not offer.
    Before a tunnel splices the sockets, a bare `101` would otherwise let the
    client's next bytes reach the upstream as raw HTTP.
    """
    if header_tokens(response, b"upgrade") != [b"websocket"]:
        raise BadUpgrade("the upstream's 101 does not upgrade to websocket")
    if b"upgrade" not in connection_tokens(response):
        raise BadUpgrade("the upstream's 101 lacks Connection: upgrade")
    keys = [value for name, value in request if name == b"sec-websocket-key"]
    accepts = [value.strip() for name, value in response if name == b"sec-websocket-accept"]
    if len(keys) != 1 or accepts != [accept_key(keys[0])]:
        raise BadUpgrade("the upstream's 101 has no valid Sec-WebSocket-Accept")
    if not _extension_names(response) <= _extension_names(request):
        raise BadUpgrade("the upstream accepted an extension the client did not offer")
    _chosen(offered_subprotocols(request), response, BadUpgrade)


def chosen_subprotocol(ws: WebSocketPlan, headers: Iterable[Header]) -> str | None:
    """The subprotocol the upstream chose; 502 if it is none the client offered."""
    return _chosen(ws.subprotocols, headers, BadGateway)


def _chosen(offered: list[str], headers: Iterable[Header],
            error: type[BadGateway]) -> str | None:
    chosen = [v.strip() for n, v in headers if n == b"sec-websocket-protocol"]
    if not chosen:
        return None
    value = chosen[0].decode("latin-1")
    if len(chosen) > 1 or value not in offered:
        raise error("the upstream chose a subprotocol the client did not offer")
    return value
