"""Where a request goes upstream: mount matching and the byte-exact target.

Everything that decides the upstream request-target lives here. The target is
built from the raw bytes the client sent, never from a decoded path: `%2F` stays
`%2F`, the query is never parsed. Client input never selects the upstream host:
the target is only ever a path appended to the configured base.
"""

from __future__ import annotations

import re

from .errors import BadRequest, NotProxied, TargetTooLong

# Visible ASCII only (RFC 9112 request-target); anything else is refused.
_VALID_TARGET = re.compile(rb"[\x21-\x7e]*\Z")
# Separators a backend may honour inside a path: `/`, `\` and their encodings.
_SEPARATORS = re.compile(rb"/|\\|%2[fF]|%5[cC]")
_ENCODED_DOT = re.compile(rb"%2[eE]")
_ABSOLUTE_FORM = re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")


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


def under_mount(path: bytes, mount: bytes) -> bool:
    """Is `path` at or below `mount`, on a segment boundary (`/apix` is not under `/api`)?"""
    return not mount or path == mount or path.startswith(mount + b"/")


def strip_mount(path: bytes, mount: bytes) -> bytes:
    """The path below `mount`, or NotProxied when it is outside (`/apix` is not `/api`)."""
    if under_mount(path, mount):
        return path[len(mount):]
    raise NotProxied("no proxy is mounted at this path")


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
    if b"%00" in rest:
        raise BadRequest("encoded NUL in path")
    if b"." not in rest and b"%2" not in rest:
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


def join_base(base: bytes, rest: bytes) -> bytes:
    """Append the path below the mount to the upstream base path."""
    if not rest:
        return base or b"/"
    if not rest.startswith(b"/"):
        rest = b"/" + rest
    return base + rest


def upstream_target(raw: bytes, mount: bytes, base: bytes, max_bytes: int) -> bytes:
    """The byte-exact upstream request-target for a raw client target."""
    path, query = split_target(origin_form(raw, max_bytes))
    rest = strip_mount(path, mount)
    check_traversal(rest)
    target = join_base(base, rest)
    return target if query is None else target + b"?" + query
