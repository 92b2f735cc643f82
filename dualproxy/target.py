"""Where a request goes upstream: mount matching and the byte-exact target.

Everything that decides the upstream request-target lives here. The target is
built from the raw bytes the client sent, never from a decoded path: `%2F` stays
`%2F`, the query is never parsed. Client input never selects the upstream host:
the target is only ever a path appended to the configured base.
"""

from __future__ import annotations

import functools
import re
import urllib.parse
from collections.abc import Sequence

from .errors import BadRequest, NotProxied, TargetTooLong
from .wire import valid_authority

# Visible ASCII only (RFC 9112 request-target); anything else is refused.
_VALID_TARGET = re.compile(rb"[\x21-\x7e]*\Z")
# Separators a backend may honour inside a path: `/`, `\` and their encodings.
_SEPARATORS = re.compile(rb"/|\\|%2[fF]|%5[cC]")
_ENCODED_DOT = re.compile(rb"%2[eE]")
_ABSOLUTE_FORM = re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")
# What may make backends read a path differently from its bytes: an escape, a
# backslash, a path parameter, an empty segment, a segment starting with a dot.
_READ_DIFFERENTLY = re.compile(rb"[%\\;]|//|/\.")
# RFC 3986 2.3: the unreserved characters, which normalisation may always decode.
_UNESCAPE = {b"%%%02X" % c: bytes((c,)) for c in
             b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"}
_ESCAPED_UNRESERVED = re.compile(
    rb"%(?:[46][1-9A-Fa-f]|[57][0-9Aa]|3[0-9]|2[DdEe]|5[Ff]|7[Ee])")
_PARAMS = re.compile(rb";[^/]*")
_MERGE = re.compile(rb"/{2,}")
# A target every rule below leaves as it is (`upstream_target`'s quick way): origin-form,
# visible ASCII, no fragment; its path without an escape, a backslash, a `;`, an empty
# segment or one starting with a dot (so no backend reads it differently, and no dot
# segment climbs), then the query if any (group 2, without its `?`).
_SEGMENT = rb"[^\x00-\x20\x7f-\xff/.%\\;?#][^\x00-\x20\x7f-\xff/%\\;?#]*"
_PLAIN_TARGET = re.compile(rb"(/(?:" + _SEGMENT + rb"(?:/" + _SEGMENT + rb")*/?)?)"
                           rb"(?:\?([^\x00-\x20\x7f-\xff#]*))?\Z")


def split_target(raw: bytes) -> tuple[bytes, bytes | None]:
    """Split a raw request-target into (path, query); query is None without `?`."""
    path, sep, query = raw.partition(b"?")
    return path, (query if sep else None)


def origin_form(raw: bytes, max_bytes: int) -> bytes:
    """Validate a raw request-target and reduce it to origin-form (`/path?query`).

    Absolute-form (`http://host/x`) keeps only its path: RFC 9112 3.2.2 says a
    server must accept it, but its authority must not pick the upstream.
    """
    if len(raw) > max_bytes:
        raise TargetTooLong(f"request target longer than {max_bytes} bytes")
    if not _VALID_TARGET.match(raw):
        raise BadRequest("request target contains control, space or non-ASCII bytes")
    # A fragment is never part of a request-target (RFC 9112 3.2): uvicorn drops it
    # before the app sees it, gunicorn's RAW_URI keeps it; drop it here for every server.
    raw = raw.partition(b"#")[0]
    if raw.startswith(b"/"):
        return raw
    match = _ABSOLUTE_FORM.match(raw)
    if match:
        rest = raw[match.end():]
        if rest.startswith(b"?"):
            return b"/" + rest
        return rest or b"/"
    raise BadRequest("request target must be an absolute path")


def target_authority(raw: bytes) -> bytes | None:
    """The authority of an absolute-form target (userinfo cut off), None for any
    other form; BadRequest when it is empty or malformed."""
    if raw[:1] == b"/":  # origin-form (the usual): no scheme starts with `/`
        return None
    match = _ABSOLUTE_FORM.match(raw)
    if match is None:
        return None
    authority = raw[raw.index(b"://") + 3:match.end()].rpartition(b"@")[2]
    if not valid_authority(authority):
        raise BadRequest("the absolute-form target names no valid host")
    return authority


def app_mount(raw_path: bytes, prefix: bytes) -> bytes:
    """The mount an enclosing app routed on (ASGI `root_path`, WSGI `SCRIPT_NAME`:
    decoded text, as bytes), for `IncomingRequest.mount`.

    The prefix when the raw path starts with it, or when only its decoded form
    does (`/%61pi/x` routed to `/api` by the app: `choose_mount` then refuses it,
    400, instead of forwarding the prefix upstream); `b""` when the server kept
    the prefix out of the raw path (a front proxy stripped it).
    """
    prefix = prefix.rstrip(b"/")
    if prefix and (raw_path.startswith(prefix)
                   or urllib.parse.unquote_to_bytes(raw_path).startswith(prefix)):
        return prefix
    return b""


def under_mount(path: bytes, mount: bytes) -> bool:
    """Is `path` at or below `mount`, on a segment boundary (`/apix` is not under `/api`)?"""
    return path.startswith(mount) and path[len(mount):len(mount) + 1] in (b"", b"/")


def _decode(path: bytes, unreserved_only: bool) -> bytes:
    if not unreserved_only:
        return urllib.parse.unquote_to_bytes(path)
    return _ESCAPED_UNRESERVED.sub(lambda match: _UNESCAPE[match[0].upper()], path)


def _resolve(path: bytes) -> bytes:
    """Dot segments removed and empty segments merged, as posixpath.normpath plus
    http.server's dropping of empty words (never above the root)."""
    out: list[bytes] = []
    for segment in path.split(b"/"):
        if segment == b"..":
            if out:
                out.pop()
        elif segment and segment != b".":
            out.append(segment)
    return b"/" + b"/".join(out)


# Small: it spares a router and its route computing one request's readings twice, and a
# hostile 8000-byte path has some twenty readings of its size.
@functools.lru_cache(maxsize=32)
def path_readings(path: bytes) -> frozenset[bytes]:
    """Every path a backend may take `path` for: the bytes as sent; percent-decoded
    (the unreserved characters only, as RFC 3986 normalisation, or all of them, as
    nginx, Starlette, werkzeug and http.server do); `\\` read as `/` (IIS, some Java
    servers); `;params` cut from every segment, before or after decoding (Tomcat,
    Spring); and each of these with repeated slashes merged (werkzeug, nginx) or dot
    segments resolved as well (nginx, http.server), the latter also before decoding
    (RFC 3986 order)."""
    if not _READ_DIFFERENTLY.search(path):
        return frozenset((path,))
    readings = {path, _PARAMS.sub(b"", path)}  # Tomcat cuts `;params` before decoding
    readings |= {_decode(r, unreserved) for r in readings for unreserved in (True, False)}
    readings |= {r.replace(b"\\", b"/") for r in readings}
    readings |= {_PARAMS.sub(b"", r) for r in readings}
    readings |= {_MERGE.sub(b"/", r) for r in readings} | {_resolve(r) for r in readings}
    readings.add(_decode(_resolve(path), False))
    return frozenset(readings)


def choose_mount(path: bytes, mounts: Sequence[bytes]) -> bytes | None:
    """THE routing rule, for every mount and route (both faces, both routers, the
    WebSocket handshake): the longest of `mounts` covering `path` (None: none does).

    Routing must see what the upstream will see: the mount is chosen for every
    reading of the path a backend may make (`path_readings`: decoded, dot segments
    resolved, slashes merged, ...), and all must agree, the bytes as sent included,
    so the raw target lies literally under the chosen mount. When they disagree
    (`/x/../admin`, `//admin`, `/%61dmin`, `/admin%2fx`, `/admin\\x` while `/admin`
    is a route), the request is refused (400): it never reaches a route other
    than the one whose mount its upstream would see.
    """
    if mounts == (b"",):
        return b""  # the root alone covers every reading
    chosen = _longest(path, mounts, literal=True)
    if not _READ_DIFFERENTLY.search(path):
        return chosen  # every reading is the path itself
    for reading in path_readings(path):
        if _longest(reading, mounts, literal=False) != chosen:
            raise BadRequest("the path reads differently once normalised (dot segments, "
                             "escapes, repeated slashes) and would change route")
    return chosen


def reachable_mount(mount: bytes) -> bool:
    """Can a request ever be routed to `mount`? Not when a backend reads the mount
    itself differently (`/a/../b`, `/a//b`, `/a\\b`, `/a;x`): `choose_mount` refuses
    every path under it, so such a mount is refused at start instead."""
    try:
        return choose_mount(mount + b"/x", (mount,)) == mount
    except BadRequest:
        return False


def _longest(path: bytes, mounts: Sequence[bytes], *, literal: bool) -> bytes | None:
    """The longest mount covering `path`: spelled as configured (`literal`), or
    also percent-decoded, for a path a backend has decoded."""
    best: bytes | None = None
    for mount in mounts:
        if best is not None and len(mount) <= len(best):
            continue
        if under_mount(path, mount) or (not literal and b"%" in mount
                                        and under_mount(path, _decoded_mount(mount))):
            best = mount
    return best


@functools.lru_cache(maxsize=64)
def _decoded_mount(mount: bytes) -> bytes:
    return _decode(mount, False)


def target_path(raw: bytes) -> bytes:
    """The path of a raw request-target in origin- or absolute-form, unvalidated
    (enough to choose a route; the chosen route's `origin_form` validates it)."""
    path = raw.partition(b"?")[0].partition(b"#")[0]
    if not path.startswith(b"/"):
        match = _ABSOLUTE_FORM.match(path)
        if match:
            path = path[match.end():] or b"/"
    return path


def check_traversal(rest: bytes) -> None:
    """Refuse dot segments that climb above the mount (and so above the upstream base).

    Backends disagree on what a separator or a dot is, so every spelling counts:
    `..`, `%2e%2e`, `.%2E`, separated by `/`, `\\`, `%2f` or `%5c`, and Tomcat's
    `..;param`. A NUL byte, encoded, is refused outright: many backends cut at it.
    """
    if rest.find(b"%00") >= 0:  # not `in` (framing.list_items)
        raise BadRequest("encoded NUL in path")
    if rest.find(b".") < 0 and rest.find(b"%2") < 0:
        return  # fast path: no dot in any spelling
    depth = 0
    for segment in _SEPARATORS.split(rest):
        name = _ENCODED_DOT.sub(b".", segment).split(b";", 1)[0]
        if name == b"..":
            depth -= 1
            if depth < 0:
                raise BadRequest("path escapes the proxied base")
        elif name and name != b".":
            depth += 1


def mount_redirect(raw: bytes, mount: bytes) -> bytes | None:
    """Where a target naming `mount` itself (no trailing slash) is redirected:
    `mount/` with the query kept; None for any other target."""
    if not mount or target_path(raw) != mount:
        return None
    query = split_target(raw.partition(b"#")[0])[1]
    return mount + b"/" + (b"" if query is None else b"?" + query)


def join_base(base: bytes, rest: bytes) -> bytes:
    """Append the path below the mount to the upstream base path."""
    if not rest:
        return base or b"/"
    if not rest.startswith(b"/"):
        rest = b"/" + rest
    return base + rest


def upstream_target(raw: bytes, mount: bytes, base: bytes, max_bytes: int,
                    mounts: Sequence[bytes] = ()) -> bytes:
    """The byte-exact upstream request-target for a raw client target under `mount`.

    `mounts`: every mount of the app the proxy is a route of (router.py), `mount`
    among them; default `mount` alone. NotProxied when the path belongs to none
    of them or to another; BadRequest when `choose_mount` finds it ambiguous.
    """
    # Most targets are plain (_PLAIN_TARGET): already in origin-form, and no dot
    # segment to climb with; one regex then stands for origin_form's and
    # check_traversal's steps.
    plain = _PLAIN_TARGET.match(raw) if len(raw) <= max_bytes else None
    if plain is None:
        path, query = split_target(origin_form(raw, max_bytes))
    else:
        path, query = plain[1], plain[2]
    if choose_mount(path, mounts or (mount,)) != mount:
        raise NotProxied("no proxy is mounted at this path")
    rest = path[len(mount):]
    if plain is None:
        check_traversal(rest)
    target = join_base(base, rest)
    return target if query is None else target + b"?" + query
