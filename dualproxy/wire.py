"""What may be written on an HTTP/1.1 wire: the one rule for names, values and targets.

Everything that decides whether a request or response head can be written
lives here. Whoever produced it (the core, an `add_*_headers` option, a hook
that copied a percent-decoded cookie into a header or rewrote the target), a
head is checked just before its bytes go out: the HTTP/1.1 client checks the
head it serialises (`serialised_head_ok`, the same rule on the bytes, for the
hot path), the hook loops check what each hook returns, and the WebSocket
handshakes check theirs. A CR or LF in a value would end the field and start
another (request smuggling, response splitting); a NUL cuts the line for many
parsers. Pure: no I/O.

- A field name is a token (RFC 9110 5.1).
- A field value carries no CR, LF or NUL (RFC 9110 5.5: the bytes a recipient
  must refuse or replace; other controls it may keep, so they pass as nginx
  passes them).
- A request-target is visible ASCII, no space or control (RFC 9112 3.2).
- A method is a token (RFC 9110 9.1).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

# Fields that describe one connection, never forwarded nor set by a rule: RFC 9110
# 7.6.1 plus the non-standard ones every proxy strips; `proxy` is httpoxy
# (CVE-2016-5385). headers.py strips them, rules.py refuses them.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
    b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"http2-settings", b"proxy",
})
TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
FIELD_NAME = re.compile(TOKEN + rb"\Z")
BAD_FIELD_VALUE = re.compile(rb"[\x00\r\n]")
TARGET = re.compile(rb"[\x21-\x7e]+\Z")
# The request line of a serialised request head (its CRLF off).
_REQUEST_LINE = re.compile(TOKEN + rb" [\x21-\x7e]+ HTTP/1\.1\Z")
# Field names found to be tokens: the same few on every request, so each is
# matched once, not once a request (bounded: clients choose them).
_TOKEN_NAMES: set[bytes] = set()
REMEMBERED = 512  # how many names (and hosts) a memo keeps: clients choose them


class WireError(ValueError):
    """A head that must not be written; `what` is "header", "target" or "method"."""

    def __init__(self, what: str, message: str) -> None:
        super().__init__(message)
        self.what = what


def field_problem(headers: Iterable[tuple[bytes, bytes]]) -> WireError | None:
    """The first field that cannot be written, as a WireError (None: all can)."""
    for name, value in headers:
        if not isinstance(name, bytes) or not FIELD_NAME.match(name):
            return WireError("header", f"invalid header name {name!r}")
        if not isinstance(value, bytes) or BAD_FIELD_VALUE.search(value):
            return WireError("header", f"invalid value for header {name!r}")
    return None


def head_problem(target: bytes | None, headers: Iterable[tuple[bytes, bytes]],
                 method: bytes = b"GET") -> WireError | None:
    """What makes a head unwritable, or None. `target` None: a response head."""
    if target is not None:
        if not isinstance(method, bytes) or not FIELD_NAME.match(method):
            return WireError("method", f"invalid method {method!r}")
        if not isinstance(target, bytes) or not TARGET.match(target):
            return WireError("target", f"invalid request target {target!r}")
    return field_problem(headers)


def check_head(target: bytes | None, headers: Iterable[tuple[bytes, bytes]],
               method: bytes = b"GET") -> None:
    """Raise the WireError of `head_problem`, if any."""
    problem = head_problem(target, headers, method)
    if problem is not None:
        raise problem


def valid_name(name: object) -> bool:
    """Is `name` a field name (a token, as bytes)? Remembers the ones that are."""
    if not isinstance(name, bytes) or FIELD_NAME.match(name) is None:
        return False
    if len(_TOKEN_NAMES) < REMEMBERED:
        _TOKEN_NAMES.add(name)
    return True


def serialised_head_ok(head: bytes, headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """Is `head` writable, the request head serialised from `headers` as the HTTP/1.1
    client writes it (the request line, `name: value` CRLF a field, CRLF)?

    The rule of `head_problem` on the bytes, for the client's hot path; `head_problem`
    then says what is wrong. Once the request line and the names are known to hold
    no CR, LF or NUL, the counts of CR and LF in the whole head prove that no value
    holds one: each is one of the head's own line ends.
    """
    lines = len(headers) + 2  # the request line, a line a field, the empty line
    if (head.count(b"\n") != lines or head.count(b"\r") != lines or head.find(b"\0") >= 0
            or _REQUEST_LINE.match(head, 0, head.find(b"\r\n")) is None):
        return False
    try:
        for name, _ in headers:
            if name not in _TOKEN_NAMES and not valid_name(name):
                return False
    except TypeError:  # an unhashable name: not bytes
        return False
    return True

# RFC 9112 3.2: Host = uri-host [":" port]; an IP-literal or a reg-name (never empty).
_HOST = re.compile(rb"(\[[0-9A-Za-z:.]+\]|[0-9A-Za-z._~!$&'()*+,;=%-]+)(:[0-9]*)?\Z")


def valid_authority(value: bytes) -> bool:
    """Is `value` a Host as RFC 9112 3.2 allows it (uri-host [":" port], not empty)?"""
    return _HOST.match(value) is not None
