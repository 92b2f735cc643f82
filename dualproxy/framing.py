"""How an HTTP/1.1 message body is framed (RFC 9112 section 6): the one rule.

The core (the client's request, the upstream's response head) and the codec
(the bytes on the upstream connection) both call `parse_framing`, so a message
is never read one way and relayed another. Pure: no httpx, no I/O.

- `Transfer-Encoding` and `Connection` are lists: items split on commas and
  whitespace trimmed. Connection drops empty items (RFC 9110 5.6.1). Transfer
  codings must be exactly `[chunked]`: anything else (gzip, identity, a
  repeated chunked, an empty field or an empty item as in `chunked,`) is
  refused. The proxy could not relay a coding unlabelled, and the parsers
  around it disagree on empty items (llhttp reads `chunked,` as close-delimited,
  h11, nginx and Go refuse it): such a message is ambiguous.
- `Content-Length` is one length; a list of equal lengths (`5, 5`, or two equal
  lines) is that length (RFC 9110 8.6); anything else is refused.
- Both headers together is a smuggling vector (RFC 9112 6.3): refused.

Refused means `FramingError`: the core answers 400 (request) or 502 (response)
and the codec raises a protocol error, so such a connection is never reused.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

NONE, LENGTH, CHUNKED, CLOSE = "none", "length", "chunked", "close"
_MAX_DIGITS = 18  # a length that fits an int64, as h11 and llhttp bound it


class FramingError(ValueError):
    """The framing headers are ambiguous or unsupported: never guess."""


class Framing(NamedTuple):
    """The framing headers of one message, validated."""

    chunked: bool              # Transfer-Encoding: chunked
    length: int | None         # Content-Length, or None
    connection: frozenset[bytes]  # Connection tokens, lower-cased


# The httpx response extension under which dualproxy's transport hands over the
# Framing its codec read the head by, so the core does not parse it again.
FRAMING = "dualproxy.framing"

# The lengths of the names read here (transfer-encoding, content-length, connection):
# a field of another length is none of them, and callers may leave it out.
FRAMING_SIZES = frozenset({17, 14, 10})
_NO_TOKENS: frozenset[bytes] = frozenset()
UNFRAMED = Framing(False, None, _NO_TOKENS)  # no framing field at all
_ONE_TOKEN = {token: frozenset((token,)) for token in (b"keep-alive", b"close", b"upgrade")}
_new = tuple.__new__
_LOWER = {spelling: name for name in (b"content-length", b"transfer-encoding", b"connection")
          for spelling in (name, name.title(), name.upper())}


def list_items(value: bytes) -> list[bytes]:
    """A list field's items: split on commas, trimmed, lower-cased, empty ones dropped."""
    # `.find`, not `in`: a bytes needle makes `in` try it as an int first, raising
    # and clearing a TypeError (CPython 3.11: some thousand instructions a test).
    if value.find(b",") < 0:  # the common case, without the split
        item = value.strip(b" \t").lower()
        return [item] if item else []
    return [item for item in (part.strip(b" \t").lower() for part in value.split(b",")) if item]


def parse_framing(headers: Iterable[tuple[bytes, bytes]]) -> Framing:
    """Read the framing headers (names in any case). Raises FramingError."""
    codings: list[bytes] | None = None
    length: bytes | None = None
    tokens: list[bytes] | None = None
    for name, value in headers:
        # The hot loop skips the rest by length (FRAMING_SIZES, inlined: a constant).
        if len(name) not in {17, 14, 10}:
            continue
        # the usual spellings by a look-up: a method call costs more
        lname = _LOWER[name] if name in _LOWER else name.lower()
        if lname == b"content-length":
            if (value.isdigit() and len(value) <= _MAX_DIGITS
                    and (length is None or value == length)):
                length = value  # the common case: one plain length, nothing to split
                continue
            for item in value.split(b",") if value.find(b",") >= 0 else (value,):
                item = item.strip(b" \t")
                if not item.isdigit() or len(item) > _MAX_DIGITS:
                    raise FramingError("invalid Content-Length")
                if length is not None and item != length:  # `05` and `5` differ too (h11)
                    raise FramingError("conflicting Content-Length values")
                length = item
        elif lname == b"connection":
            if tokens is None and value in _ONE_TOKEN:  # the commonest: keep-alive, close
                tokens = [value]
            elif tokens is None and value.find(b",") < 0:  # the common case: one token
                item = value.strip(b" \t").lower()
                tokens = [item] if item else []
            else:
                tokens = list_items(value) if tokens is None else tokens + list_items(value)
        elif lname == b"transfer-encoding":
            items = [item.strip(b" \t").lower() for item in value.split(b",")]
            if b"" in items:
                # RFC 9110 5.6.1 would drop it, but llhttp then reads the body
                # close-delimited, h11, nginx and Go refuse it: ambiguous.
                raise FramingError("empty item in Transfer-Encoding")
            codings = items if codings is None else codings + items
    if codings is not None:
        if length is not None:
            raise FramingError("both Transfer-Encoding and Content-Length")
        if codings != [b"chunked"]:
            raise FramingError("unsupported transfer coding")
    if codings is None and length is None and tokens is None:
        return UNFRAMED  # most requests: no body, no Connection header
    # tuple.__new__: a NamedTuple's own constructor costs a Python call (hot path)
    if not tokens:
        named = _NO_TOKENS
    elif len(tokens) == 1 and tokens[0] in _ONE_TOKEN:
        named = _ONE_TOKEN[tokens[0]]  # shared: frozensets are immutable
    else:
        named = frozenset(tokens)
    return _new(Framing, (codings is not None, None if length is None else int(length), named))


assert FRAMING_SIZES == {len(b"transfer-encoding"), len(b"content-length"), len(b"connection")}


def request_body(framing: Framing) -> tuple[str, int]:
    """(kind, length) of a request body: chunked, a length, or none (RFC 9112 6.3)."""
    if framing.chunked:
        return CHUNKED, 0
    if framing.length is not None:
        return LENGTH, framing.length
    return NONE, 0


def response_body(framing: Framing, status: int, method: bytes) -> tuple[str, int]:
    """(kind, length) of a response body; without a length it runs to the close."""
    if status < 200 or status == 204 or status == 304 or method == b"HEAD":
        return NONE, 0
    if framing.chunked:
        return CHUNKED, 0
    if framing.length is not None:
        return LENGTH, framing.length
    return CLOSE, 0


def keeps_alive(framing: Framing, minor_version: int) -> bool:
    """May the connection carry another message after this one (RFC 9112 9.3)?"""
    if minor_version >= 1:
        return b"close" not in framing.connection
    return b"keep-alive" in framing.connection
