"""The header policy, both directions.

Everything that decides which header crosses the proxy lives here: hop-by-hop
stripping (RFC 9110 7.6.1), the forwarding headers (X-Forwarded-*, RFC 7239
`Forwarded`), Host, and the rewriting of redirects and cookies on the way back.
Names are handled lower-cased, values as raw bytes, and order and duplicates
are kept: several `Set-Cookie` stay several.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence

from .config import ProxyConfig
from .errors import BadGateway, BadRequest, HeadersTooLarge
from .framing import Framing, FramingError, list_items, parse_framing
from .wire import BAD_FIELD_VALUE, FIELD_NAME, HOP_BY_HOP, valid_authority

Header = tuple[bytes, bytes]

# HOP_BY_HOP (wire.py): RFC 9110 7.6.1 plus the ones every proxy strips. `te` is
# special-cased below: `TE: trailers` may pass.
# Never copied from the client: the proxy sets framing and Host itself, and the
# front server has already answered `Expect: 100-continue` (as nginx does).
_REQUEST_OWNED = frozenset({b"host", b"content-length", b"expect"})
# Forwarding headers: believed only from a trusted peer.
FORWARDING = frozenset({
    b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port",
    b"x-forwarded-prefix", b"forwarded", b"x-real-ip",
})
# Every supported server writes its own Date and Server; passing the upstream's
# would send both fields twice, which RFC 9110 forbids for singletons.
_RESPONSE_OWNED = frozenset({b"date", b"server"})

_TOKEN = FIELD_NAME
_BAD_VALUE = BAD_FIELD_VALUE
# RFC 9112 3.2 / RFC 3986 3.2.2: uri-host [ ":" port ], reg-name or IP literal; never
# empty (RFC 9110 4.2.1: an http URI with an empty host is invalid, so a Host naming
# one is a 400 for RFC 9112 3.2).
# RFC 7239 4: Forwarded = 1#forwarded-element, an element `[pair] *(";" [pair])`, a pair
# `token "=" ( token / quoted-string )` (RFC 9110 5.6.4 quoting).
_FIELD_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED = rb'"(?:[^"\\\x00-\x08\x0a-\x1f\x7f]|\\[^\x00-\x08\x0a-\x1f\x7f])*"'
_PAIR = _FIELD_TOKEN + rb"=(?:" + _FIELD_TOKEN + rb"|" + _QUOTED + rb")"
# One pair (or none) and the separator after it; a loop over these is linear
# (a single regex for the whole list backtracks exponentially on a bad value).
_FORWARDED_PIECE = re.compile(rb"[ \t]*(?:" + _PAIR + rb"[ \t]*)?([;,]|\Z)")


# Field names and Host values found valid before: the same few on every request, so
# each is matched once, not once a request (bounded: clients choose them).
_VALID_NAMES: set[bytes] = set()
_VALID_HOSTS: set[bytes] = set()
_REMEMBERED = 512


def _valid_name(name: bytes) -> bool:
    if name in _VALID_NAMES:
        return True
    if _TOKEN.match(name) is None:
        return False
    if len(_VALID_NAMES) < _REMEMBERED:
        _VALID_NAMES.add(name)
    return True


def _valid_host(value: bytes) -> bool:
    if value in _VALID_HOSTS:
        return True
    if not valid_authority(value):
        return False
    if len(_VALID_HOSTS) < _REMEMBERED:
        _VALID_HOSTS.add(value)
    return True


def connection_tokens(headers: Iterable[Header]) -> set[bytes]:
    """Every header name listed in any `Connection` line (they are hop-by-hop too)."""
    names: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            names.update(list_items(value))
    return names


def is_hop_by_hop(name: bytes, named: set[bytes]) -> bool:
    return name in HOP_BY_HOP or name in named


def check_request_headers(headers: Sequence[Header], config: ProxyConfig, *,
                          require_host: bool = False) -> None:
    """Bound the head's size the same on every server, and refuse CR/LF/NUL.

    `require_host`: the request is HTTP/1.1, which must carry exactly one Host.
    """
    if len(headers) > config.max_header_count:
        raise HeadersTooLarge(f"more than {config.max_header_count} request headers")
    total = 0
    hosts = 0
    for name, value in headers:
        total += len(name) + len(value) + 4
        if (name not in _VALID_NAMES and not _valid_name(name)) or _BAD_VALUE.search(value):
            raise BadRequest("malformed request header")
        if name == b"host":
            # RFC 9112 3.2: more than one Host, or an invalid (or empty) one, is a 400
            # (gunicorn says so itself, uvicorn does not: decide it here for every server).
            hosts += 1
            if hosts > 1 or (value not in _VALID_HOSTS and not _valid_host(value)):
                raise BadRequest("more than one Host header, or an invalid one")
    if require_host and not hosts:
        # RFC 9112 3.2: an HTTP/1.1 request without Host is a 400 (as nginx and Go answer).
        raise BadRequest("HTTP/1.1 request without a Host header")
    if total > config.max_header_bytes:
        raise HeadersTooLarge(f"request headers larger than {config.max_header_bytes} bytes")


def _forwarded_node(peer: str) -> bytes:
    # RFC 7239 6: IPv6 addresses are bracketed and the value quoted.
    if ":" in peer:
        return f'"[{peer}]"'.encode()
    return peer.encode()


def _quote_if_needed(value: bytes) -> bytes:
    if value in _VALID_NAMES or _valid_name(value):  # a token
        return value
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def well_formed_forwarded(value: bytes) -> bool:
    """Does `value` follow RFC 7239's grammar (an unterminated quote does not)?"""
    pos = 0
    while True:
        match = _FORWARDED_PIECE.match(value, pos)
        if match is None:
            return False
        if not match[1]:  # the end of the value
            return True
        pos = match.end()



def client_address(headers: Sequence[Header], config: ProxyConfig,
                   peer: str | None) -> str | None:
    """The client's address: the peer, or behind trusted proxies the X-Forwarded-For
    entry nearest to us that no trusted proxy holds (nginx's `real_ip_recursive`).

    Every trusted hop appended the address it saw, so the rightmost untrusted entry
    is the first one a trusted proxy vouches for; entries left of it are the
    client's to forge. Text as received (possibly not an address): for the log.
    """
    if not config.trusted_proxies or not config.is_trusted(peer):  # (none: no call)
        return peer
    hops = [hop.strip().decode("latin-1")
            for name, value in headers if name == b"x-forwarded-for"
            for hop in value.split(b",") if hop.strip()]
    for hop in reversed(hops):
        if not config.is_trusted(hop):
            return hop
    return hops[0] if hops else peer


def request_headers(
    headers: Sequence[Header],
    config: ProxyConfig,
    *,
    peer: str | None,
    scheme: str,
    te_trailers: bool | None = None,
    authority: bytes | None = None,
) -> list[Header]:
    """The header list to send upstream, minus framing (the caller adds that).

    Host comes first: the upstream's authority, or the client's with
    preserve_host. Forwarding headers are regenerated from the real peer and the
    client's own are kept (appended to) only when that peer is trusted, a
    malformed `Forwarded` line dropped (its open quote would swallow ours).
    `authority`: an absolute-form target's, which RFC 9112 3.2.2 puts before
    the Host header (the client's host for preserve_host and X-Forwarded-Host).
    Names with `_` are dropped unless config.underscores_in_headers (nginx's
    `underscores_in_headers off`): a WSGI upstream would read `X_Forwarded_For`
    as X-Forwarded-For.
    """
    named = connection_tokens(headers)
    trusted = config.is_trusted(peer)
    client_host: bytes | None = None
    inbound_xff: list[bytes] = []
    inbound_fwd: list[bytes] = []
    inbound_proto: bytes | None = None
    inbound_xhost: bytes | None = None
    wants_trailers = False
    out: list[Header] = []
    remove = config.remove_request_headers
    underscores = config.underscores_in_headers
    for name, value in headers:
        if not underscores and name.find(b"_") >= 0:  # not `in` (framing.list_items)
            continue
        if name == b"host":
            if client_host is None:
                client_host = value
            continue
        if name == b"te":
            # RFC 9110 10.1.4: only the `trailers` token may be forwarded.
            wants_trailers = wants_trailers or any(
                token.split(b";", 1)[0].strip().lower() == b"trailers"
                for token in value.split(b","))
            continue
        if name in HOP_BY_HOP or name in named or name in _REQUEST_OWNED or name in remove:
            continue
        if name in FORWARDING:
            if trusted:
                if name == b"x-forwarded-for":
                    inbound_xff.append(value)
                elif name == b"forwarded":
                    if well_formed_forwarded(value):
                        inbound_fwd.append(value)
                elif name == b"x-forwarded-proto" and inbound_proto is None:
                    inbound_proto = value
                elif name == b"x-forwarded-host" and inbound_xhost is None:
                    inbound_xhost = value
                else:
                    out.append((name, value))
            continue
        out.append((name, value))

    if te_trailers is not None:
        wants_trailers = te_trailers
    if authority is not None:
        client_host = authority
    host = client_host if (config.preserve_host and client_host) else config.upstream_authority
    result: list[Header] = [(b"host", host)]
    result.extend(out)
    if wants_trailers:
        result.append((b"te", b"trailers"))

    fwd_host = client_host or config.upstream_authority
    if trusted:
        result += _forwarding(peer, scheme, fwd_host, inbound_xff, inbound_fwd, inbound_proto,
                              inbound_xhost)
    else:  # nothing inbound: the same few fields for every request of a client and host
        key = (peer, scheme, fwd_host)
        forwarding = _FORWARDING.get(key)
        if forwarding is None:
            forwarding = _forwarding(peer, scheme, fwd_host, [], [], None, None)
            if len(_FORWARDING) < _REMEMBERED:
                _FORWARDING[key] = forwarding
        result += forwarding
    result.extend(config.add_request_headers)
    return result


# (peer, scheme, forwarded host) -> the forwarding fields of an untrusted peer's request,
# for the ones seen so far; bounded, as clients choose them.
_FORWARDING: dict[tuple[str | None, str, bytes], tuple[Header, ...]] = {}


def _forwarding(peer: str | None, scheme: str, fwd_host: bytes, inbound_xff: list[bytes],
                inbound_fwd: list[bytes], inbound_proto: bytes | None,
                inbound_xhost: bytes | None) -> tuple[Header, ...]:
    """X-Forwarded-For/-Proto/-Host and Forwarded, regenerated from the real peer after
    what a trusted peer sent (`inbound_*`)."""
    fields: list[Header] = []
    proto = scheme.encode()
    xff = b", ".join([*inbound_xff, peer.encode()]) if peer else b", ".join(inbound_xff)
    if xff:
        fields.append((b"x-forwarded-for", xff))
    fields.append((b"x-forwarded-proto", inbound_proto or proto))
    fields.append((b"x-forwarded-host", inbound_xhost or fwd_host))
    node = b"for=" + _forwarded_node(peer) if peer else b"for=unknown"
    element = node + b";host=" + _quote_if_needed(fwd_host) + b";proto=" + proto
    fields.append((b"forwarded", b", ".join([*inbound_fwd, element])))
    return tuple(fields)


def _rewrite_url(value: bytes, config: ProxyConfig, mount: bytes) -> bytes:
    """nginx `proxy_redirect default`: the upstream base URL becomes the mount.

    Absolute URLs on an upstream's origin and base, and absolute paths under the
    base (every absolute path when the base is the root), are rewritten; anything
    else (other hosts, `//host/x` network paths, relative refs) passes untouched.
    A rewritten value stays on this host: one that would read as scheme-relative
    (`/app//evil.example/x` with base `/app` at the root) gets `/.` in front.
    """
    base = config.upstream_base
    # Every upstream of the pool: a redirect names whichever one served it.
    prefixes = [u.origin.encode() + base for u in config.upstreams]
    if value[:1] == b"/" and value[:2] != b"//":
        prefixes.append(base)
    for prefix in prefixes:
        if value.startswith(prefix):
            rest = value[len(prefix):]
            if rest and rest[:1] not in (b"/", b"?", b"#"):
                continue  # `/basement` is not under `/base`
            path = mount + rest
            path = path if path.startswith(b"/") else b"/" + path
            return b"/." + path if _names_a_host(path) else path
    return value


def _names_a_host(path: bytes) -> bool:
    """Would a browser read this `/...` reference as `//host...`? The WHATWG URL
    parser takes `\\` for `/` and drops tabs and newlines anywhere in a URL."""
    return path.translate(None, b"\t\n\r")[1:2] in (b"/", b"\\")


def _rewrite_refresh(value: bytes, config: ProxyConfig, mount: bytes) -> bytes:
    head, sep, url = value.partition(b"url=")
    if not sep:
        head, sep, url = value.partition(b"URL=")
    if not sep:
        return value
    return head + sep + _rewrite_url(url.strip(), config, mount)


def _rewrite_set_cookie(value: bytes, config: ProxyConfig, mount: bytes) -> bytes:
    parts = value.split(b";")
    changed = False
    for i, part in enumerate(parts[1:], start=1):
        key, eq, attr = part.strip().partition(b"=")
        lkey = key.lower()
        if lkey == b"path" and eq and config.rewrite_cookie_path:
            base = config.upstream_base
            if attr == base or attr.startswith(base + b"/") or not base:
                new = mount + attr[len(base):] if base else mount + attr
                parts[i] = b" Path=" + (new if new.startswith(b"/") else b"/" + new)
                changed = True
        elif lkey == b"domain" and eq and config.cookie_domain is not None:
            if config.cookie_domain:
                parts[i] = b" Domain=" + config.cookie_domain.encode()
            else:
                parts[i] = b""
            changed = True
    if not changed:
        return value
    return b";".join(p for p in parts if p)


# The response fields `response_headers` may rewrite (the rest pass as they are or not at all).
_RESPONSE_SPECIAL = frozenset({b"content-length", b"location", b"content-location", b"refresh",
                               b"set-cookie"})


@functools.lru_cache(maxsize=16)
def _dropped_response_fields(remove: frozenset[bytes]) -> frozenset[bytes]:
    """The response fields never passed down: hop-by-hop, the server's own, `remove`."""
    return HOP_BY_HOP | _RESPONSE_OWNED | remove


def response_headers(
    headers: Sequence[Header],
    config: ProxyConfig,
    *,
    mount: bytes,
    framing: Framing | None = None,
) -> list[Header]:
    """The header list to send to the client, framing included when it is a length.

    Transfer-Encoding is hop-by-hop: the front server re-frames the stream
    itself. Framing is judged by `framing`, the rule the codec reads the
    body by: anything it refuses (both headers, conflicting lengths, a coding
    other than chunked) is a 502. Equal lengths (`5, 5`) become one.
    """
    if framing is None:  # given: parse_framing(headers) already ran (see plan_response)
        try:
            framing = parse_framing(headers)
        except FramingError as exc:
            raise BadGateway(
                f"the upstream sent framing the proxy cannot relay: {exc}") from None
    named = framing.connection  # the same tokens connection_tokens() finds
    length = None if framing.length is None else str(framing.length).encode()
    out: list[Header] = []
    try:
        dropped = _dropped_response_fields(config.remove_response_headers)
    except TypeError:  # a set given to ProxyConfig directly (unhashable)
        dropped = HOP_BY_HOP | _RESPONSE_OWNED | frozenset(config.remove_response_headers)
    rewrite = config.rewrite_redirects
    cookies = config.rewrite_cookie_path or config.cookie_domain is not None
    seen_length = False
    for name, value in headers:
        if name in dropped or name in named:
            continue
        if name not in _RESPONSE_SPECIAL:  # most fields: passed as they are
            out.append((name, value))
            continue
        if name == b"content-length":
            if seen_length or length is None:
                continue
            seen_length = True
            value = length
        elif rewrite and (name == b"location" or name == b"content-location"):
            value = _rewrite_url(value, config, mount)
        elif rewrite and name == b"refresh":
            value = _rewrite_refresh(value, config, mount)
        elif cookies and name == b"set-cookie":
            value = _rewrite_set_cookie(value, config, mount)
        out.append((name, value))
    out.extend(config.add_response_headers)
    return out
