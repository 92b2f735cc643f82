"""The header policy, both directions.

Everything that decides which header crosses the proxy lives here: hop-by-hop
stripping (RFC 9110 7.6.1), the forwarding headers (X-Forwarded-*, RFC 7239
`Forwarded`), Host, and the rewriting of redirects and cookies on the way back.
Names are handled lower-cased, values as raw bytes, and order and duplicates
are kept: several `Set-Cookie` stay several.
"""

from __future__ import annotations

import functools
import operator
import re
from collections.abc import Iterable, Sequence

from .config import ProxyConfig
from .errors import BadGateway, BadRequest, HeadersTooLarge
from .framing import Framing, FramingError, list_items, parse_framing
from .wire import BAD_FIELD_VALUE, HOP_BY_HOP, REMEMBERED, valid_authority, valid_name

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
# each is matched once, not once a request (bounded: clients choose them). A valid
# name maps to its kind for `request_headers` (`_kind`), so one look-up a field
# serves both the check and the policy.
_VALID_NAMES: dict[bytes, int] = {}
_VALID_HOSTS: set[bytes] = set()
_REMEMBERED = REMEMBERED

# Request field kinds (`_kind`): what `request_headers` does with a name, the
# configuration's choices (underscores, removals) and Connection's names aside.
_PLAIN, _UNDERSCORED, _HOST, _TE, _DROPPED, _FORWARDED_FOR, _FORWARDED, _FORWARDED_PROTO, \
    _FORWARDED_HOST, _FORWARDING_OTHER = range(10)
_KINDS = {
    b"host": _HOST, b"te": _TE, b"x-forwarded-for": _FORWARDED_FOR, b"forwarded": _FORWARDED,
    b"x-forwarded-proto": _FORWARDED_PROTO, b"x-forwarded-host": _FORWARDED_HOST,
}


def _kind(name: bytes) -> int:
    """A request field name's kind (`request_headers` applies it)."""
    kind = _KINDS.get(name)
    if kind is not None:
        return kind
    if name.find(b"_") >= 0:  # not `in` (framing.list_items)
        return _UNDERSCORED
    if name in HOP_BY_HOP or name in _REQUEST_OWNED:
        return _DROPPED
    return _FORWARDING_OTHER if name in FORWARDING else _PLAIN


def _valid_name(name: bytes) -> bool:
    if name in _VALID_NAMES:
        return True
    if not valid_name(name):  # the token rule, and its memo, are the wire's
        return False
    if len(_VALID_NAMES) < _REMEMBERED:
        _VALID_NAMES[name] = _kind(name)
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


_value = operator.itemgetter(1)
# Up to this many fields, each value is searched for CR, LF and NUL (one regex search
# a value, some fifty instructions a byte); more, and all of them are joined and
# scanned three times by memchr, whatever their length (a browser's head).
_SEARCHED_ONE_BY_ONE = 4


def check_request_headers(headers: Sequence[Header], config: ProxyConfig, *,
                          require_host: bool = False) -> None:
    """Bound the head's size the same on every server, and refuse CR/LF/NUL.

    `require_host`: the request is HTTP/1.1, which must carry exactly one Host.
    """
    if len(headers) > config.max_header_count:
        raise HeadersTooLarge(f"more than {config.max_header_count} request headers")
    few = len(headers) <= _SEARCHED_ONE_BY_ONE
    total = 0
    hosts = 0
    for name, value in headers:
        total += len(name) + len(value) + 4
        if ((name not in _VALID_NAMES and not _valid_name(name))
                or few and _BAD_VALUE.search(value) is not None):
            raise BadRequest("malformed request header")
        if name == b"host":
            # RFC 9112 3.2: more than one Host, or an invalid (or empty) one, is a 400
            # (gunicorn says so itself, uvicorn does not: decide it here for every server).
            hosts += 1
            if hosts > 1 or (value not in _VALID_HOSTS and not _valid_host(value)):
                raise BadRequest("more than one Host header, or an invalid one")
    if not few:  # a bad byte in one value is one in their concatenation
        values = b"".join(map(_value, headers))
        if values.find(0) >= 0 or values.find(13) >= 0 or values.find(10) >= 0:
            raise BadRequest("malformed request header")
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
    return upstream_fields(headers, config, peer, scheme, authority, None, te_trailers)


def upstream_fields(headers: Sequence[Header], config: ProxyConfig, peer: str | None,
                    scheme: str, authority: bytes | None = None,
                    named: frozenset[bytes] | set[bytes] | None = None,
                    te_trailers: bool | None = None) -> list[Header]:
    """`request_headers`, its arguments positional (the core's per-request call).
    `named`: the names the Connection header lists, when the caller has them
    (`Framing.connection`, what `connection_tokens` finds)."""
    if named is None:
        named = connection_tokens(headers)
    remove = config.remove_request_headers
    skip = named | remove if remove else named  # dropped unless Host or TE
    trusted = bool(config.trusted_proxies) and config.is_trusted(peer)
    underscores = config.underscores_in_headers
    kinds = _VALID_NAMES
    client_host: bytes | None = None
    inbound_xff: list[bytes] = []
    inbound_fwd: list[bytes] = []
    inbound_proto: bytes | None = None
    inbound_xhost: bytes | None = None
    wants_trailers = False
    out: list[Header] = [(b"host", b"")]  # Host comes first: set below
    for name, value in headers:
        kind = kinds.get(name)
        if kind is None:  # not a name seen valid before
            kind = _kind(name)
        if kind == _PLAIN or (kind == _UNDERSCORED and underscores):
            if name not in skip:
                out.append((name, value))
        elif kind == _HOST:
            if client_host is None:
                client_host = value
        elif kind == _TE:
            # RFC 9110 10.1.4: only the `trailers` token may be forwarded.
            wants_trailers = wants_trailers or any(
                token.split(b";", 1)[0].strip().lower() == b"trailers"
                for token in value.split(b","))
        elif kind >= _FORWARDED_FOR and trusted and name not in skip:
            # Forwarding headers: believed only from a trusted peer.
            if kind == _FORWARDED_FOR:
                inbound_xff.append(value)
            elif kind == _FORWARDED:
                if well_formed_forwarded(value):
                    inbound_fwd.append(value)
            elif kind == _FORWARDED_PROTO:
                if inbound_proto is None:
                    inbound_proto = value
            elif kind == _FORWARDED_HOST:
                if inbound_xhost is None:
                    inbound_xhost = value
            else:
                out.append((name, value))
        # (the rest: underscored names, hop-by-hop and the proxy's own fields, untrusted
        # forwarding fields: dropped)

    if te_trailers is not None:
        wants_trailers = te_trailers
    if authority is not None:
        client_host = authority
    upstream_authority = config.upstream_authority
    if config.preserve_host and client_host:
        out[0] = (b"host", client_host)
    else:
        out[0] = (b"host", upstream_authority)
    if wants_trailers:
        out.append((b"te", b"trailers"))

    fwd_host = client_host or upstream_authority
    if trusted:
        out += _forwarding(peer, scheme, fwd_host, inbound_xff, inbound_fwd, inbound_proto,
                           inbound_xhost)
    else:  # nothing inbound: the same few fields for every request of a client and host
        out += _untrusted_forwarding(peer, scheme, fwd_host)
    if config.add_request_headers:
        out.extend(config.add_request_headers)
    return out


@functools.lru_cache(maxsize=_REMEMBERED)
def _untrusted_forwarding(peer: str | None, scheme: str, fwd_host: bytes,
                          ) -> tuple[Header, ...]:
    """The forwarding fields of an untrusted peer's request: made once a (peer, scheme,
    forwarded host), the least recently used forgotten (clients choose them)."""
    return _forwarding(peer, scheme, fwd_host, [], [], None, None)


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


# What `response_fields` does with a response field (`_response_actions`): none, passed
# as it is; dropped (hop-by-hop, the server's own, removed by the configuration); the
# upstream's Date (dropped, noted); its length, a URL, a refresh and a cookie (rewritten).
_DROP, _DATE, _LENGTH, _URL, _REFRESH, _COOKIE = range(6)
_RESPONSE_SPECIAL = {b"content-length": _LENGTH, b"location": _URL,
                     b"content-location": _URL, b"refresh": _REFRESH, b"set-cookie": _COOKIE}


@functools.lru_cache(maxsize=16)
def _response_actions(remove: frozenset[bytes]) -> dict[bytes, int]:
    """The actions of every response field not passed as it is (`remove`: the
    configuration's removals); dropping comes first."""
    actions = {**_RESPONSE_SPECIAL, **dict.fromkeys(HOP_BY_HOP | _RESPONSE_OWNED | remove, _DROP)}
    actions[b"date"] = _DATE
    return actions


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
    return response_fields(headers, config, mount, framing)[0]


def response_fields(headers: Sequence[Header], config: ProxyConfig, mount: bytes,
                    framing: Framing | None = None, spelled: bool = False,
                    ) -> tuple[list[Header], bytes | None]:
    """`response_headers`, its arguments positional, and the upstream's Date (None:
    none). `spelled`: the names are as the wire spelled them (any case), lower-cased
    here: one pass over the fields."""
    if framing is None:  # given: parse_framing(headers) already ran (see plan_response)
        try:
            framing = parse_framing(headers)
        except FramingError as exc:
            raise BadGateway(
                f"the upstream sent framing the proxy cannot relay: {exc}") from None
    named = framing.connection  # the same tokens connection_tokens() finds
    try:
        actions = _response_actions(config.remove_response_headers)
    except TypeError:  # a set given to ProxyConfig directly (unhashable)
        actions = _response_actions(frozenset(config.remove_response_headers))
    act = actions.get
    out: list[Header] = []
    date: bytes | None = None
    seen_length = False
    for name, value in headers:
        if spelled:
            name = name.lower()
        action = act(name)
        if action is None:  # most fields: passed as they are
            if name not in named:
                out.append((name, value))
            continue
        if action == _DATE:
            if date is None:
                date = value
            continue
        if action == _DROP or name in named:
            continue
        if action == _LENGTH:
            if seen_length or framing.length is None:
                continue
            seen_length = True
            value = str(framing.length).encode()
        elif action == _URL:
            if config.rewrite_redirects:
                value = _rewrite_url(value, config, mount)
        elif action == _REFRESH:
            if config.rewrite_redirects:
                value = _rewrite_refresh(value, config, mount)
        elif config.rewrite_cookie_path or config.cookie_domain is not None:  # _COOKIE
            value = _rewrite_set_cookie(value, config, mount)
        out.append((name, value))
    if config.add_response_headers:
        out.extend(config.add_response_headers)
    return out, date
