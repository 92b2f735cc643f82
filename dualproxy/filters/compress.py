"""The compression filter (`--compress`, `compress = true`, `ProxyConfig(compress=...)`).

Per response: when the body may be compressed (`eligible`) the response gets
`Vary: Accept-Encoding`, and when the client accepts a coding this process can
encode (`negotiate`, RFC 9110 12.5.3: q-values, `*`, `identity;q=0`; ties go to
zstd, then br, then gzip) the body is encoded as it streams, flushed after every
upstream chunk (codings.py) so streams and server-sent events stay live. The
chain drops Content-Length and weakens a strong ETag (chain.py).

Left as it is: a response already Content-Encoded, one with `Cache-Control:
no-transform` (RFC 9110 7.7), a 206 part and any answer to a request with a
Range, HEAD/204/304 answers (no body: a HEAD answer still gets the Vary), a
body shorter than `min_length` when its Content-Length says so, and a type not
in `types` (images, video, audio, archives, fonts already compressed).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..core import ResponseHead
from ..headers import Header
from .base import Exchange, Filter
from .codings import encodable, encoder

if TYPE_CHECKING:
    from ..config import ProxyConfig

#: Compressed when the body is at least this long (bytes), if its length is known.
#: Below about a kilobyte the saving is a few hundred bytes at most, and the
#: response fits one TCP segment either way (nginx's docs suggest 1000; Caddy's
#: default is 512).
DEFAULT_MIN_LENGTH = 1024

#: The media types compressed by default (the type without its parameters):
#: text, and the structured and script types that are text underneath. `type/*`
#: matches a whole type, `type/*+suffix` a structured-syntax suffix (RFC 6838 4.2.8).
DEFAULT_TYPES: tuple[str, ...] = (
    "text/*",                        # html, css, plain, csv, event-stream, javascript...
    "application/json", "application/*+json", "application/x-ndjson",
    "application/javascript", "application/x-javascript", "application/ecmascript",
    "application/xml", "application/*+xml",   # xhtml, rss, atom, soap...
    "image/svg+xml", "image/x-icon", "image/vnd.microsoft.icon", "image/bmp",
    "application/wasm",
    "application/yaml", "application/toml", "application/x-www-form-urlencoded",
    "application/rtf", "application/x-sh", "application/graphql",
    "font/ttf", "font/otf", "application/vnd.ms-fontobject",  # woff/woff2 are compressed
)

#: Our preference among codings a client accepts equally (RFC 9110 leaves ties to
#: the server): zstd compresses fastest, br best for the same time, gzip everywhere.
PREFERENCE: tuple[str, ...] = ("zstd", "br", "gzip")


@dataclass(frozen=True)
class Compression:
    """What `compress=` accepts besides True (the defaults below).

    `min_length`: bodies whose Content-Length is smaller pass uncompressed (a body
    without one, streamed, is compressed). `types`: the media types compressed
    (`text/*`, `application/*+json` patterns allowed). `codings`: the codings
    offered, in our order of preference for ties; one this process cannot encode
    (br without `brotli`, zstd without `zstandard`) is never offered.
    """

    min_length: int = DEFAULT_MIN_LENGTH
    types: Sequence[str] = DEFAULT_TYPES
    codings: Sequence[str] = PREFERENCE

    def __post_init__(self) -> None:
        if isinstance(self.min_length, bool) or not isinstance(self.min_length, int) \
                or self.min_length < 0:
            raise ValueError(f"compress min_length must be an integer >= 0, "
                             f"got {self.min_length!r}")
        for what, values in (("types", self.types), ("codings", self.codings)):
            if isinstance(values, str):
                raise ValueError(f"compress {what} must be a list of strings, not one string")
        if not all(isinstance(v, str) for v in (*self.types, *self.codings)):
            raise ValueError("compress types and codings must be lists of strings")
        unknown = [c for c in self.codings if c.strip().lower() not in PREFERENCE]
        if unknown:
            raise ValueError(f"compress codings: {', '.join(map(repr, unknown))} unknown "
                             f"(known: {', '.join(PREFERENCE)})")
        for pattern in self.types:
            if pattern.count("/") != 1 or not all(pattern.split("/")):
                raise ValueError(f"compress types: {pattern!r} is not a media type "
                                 "(type/subtype, type/* or type/*+suffix)")
        object.__setattr__(self, "types", tuple(t.strip().lower() for t in self.types))
        object.__setattr__(self, "codings", tuple(c.strip().lower() for c in self.codings))


def compress_filter(config: ProxyConfig) -> Compress | None:
    """The route's compression filter, when its `compress=` turns it on."""
    setting = config.compress
    if not setting:
        return None
    return Compress(setting if isinstance(setting, Compression) else Compression())


class Compress(Filter):
    """Encodes response bodies in the coding the client prefers (see the module)."""

    name = "compress"

    def __init__(self, settings: Compression | None = None) -> None:
        self.settings = settings if settings is not None else Compression()
        usable = encodable()
        self.offered = tuple(c.encode() for c in self.settings.codings if c.encode() in usable)
        exact, wild, suffixes = set(), set(), set()
        for pattern in self.settings.types:
            kind, sub = pattern.encode("latin-1").split(b"/")
            if sub == b"*":
                wild.add(kind)
            elif sub.startswith(b"*+"):
                suffixes.add((kind, sub[1:]))
            else:
                exact.add(kind + b"/" + sub)
        self._exact, self._wild, self._suffixes = frozenset(exact), frozenset(wild), suffixes

    def compressible(self, content_type: bytes | None) -> bool:
        """Is this Content-Type one of `types`?"""
        if not content_type:
            return False
        media = content_type.split(b";", 1)[0].strip().lower()
        kind, _, sub = media.partition(b"/")
        if media in self._exact or kind in self._wild:
            return True
        return any(kind == k and sub.endswith(s) for k, s in self._suffixes)

    def on_response(self, exchange: Exchange, head: ResponseHead) -> ResponseHead | None:
        if not self.offered or not self.eligible(exchange, head):
            return None
        _add_vary(head.headers)
        coding = negotiate(_values(exchange.incoming.headers, b"accept-encoding"), self.offered)
        if coding is None:
            return head
        transform = encoder(coding)
        if transform is None or not exchange.transform_response(transform):
            return head  # HEAD, 204, 304: no body to encode (the chain says)
        # (A Content-Encoding here says identity: replaced by ours.)
        head.headers[:] = [(n, v) for n, v in head.headers if n.lower() not in _STALE
                           and n.lower() != b"content-encoding"]
        head.headers.append((b"content-encoding", coding))
        return head

    def eligible(self, exchange: Exchange, head: ResponseHead) -> bool:
        """May this response be compressed for a client that accepts it?"""
        if head.status == 206 or any(
                name == b"range" for name, _ in exchange.incoming.headers):
            return False
        headers = head.headers
        if any(v.strip().lower() not in (b"", b"identity")
               for v in _values(headers, b"content-encoding")):
            return False
        if b"no-transform" in _tokens(_values(headers, b"cache-control")):
            return False
        if _values(headers, b"content-range"):
            return False
        types = _values(headers, b"content-type")
        if len(types) != 1 or not self.compressible(types[0]):
            return False
        lengths = _values(headers, b"content-length")
        # A HEAD answer's Content-Length is the GET body's: the same decision.
        return not (lengths and lengths[0].strip().isdigit()
                    and int(lengths[0]) < self.settings.min_length)


# Fields that describe the identity bytes, wrong once the body is encoded: ranges
# of it (nginx clears Accept-Ranges too) and digests of it (RFC 9530, RFC 3230).
_STALE = frozenset({b"accept-ranges", b"content-md5", b"digest", b"content-digest",
                    b"repr-digest"})


def negotiate(accept_encoding: Sequence[bytes], offered: Sequence[bytes]) -> bytes | None:
    """The coding to send (None: identity) for the client's Accept-Encoding field
    values, from `offered` (in our order of preference), per RFC 9110 12.5.3:

    - no Accept-Encoding, or an empty one: identity (the client states no
      preference, or wants none; a client that never asked may not decode);
    - a coding's q is its own entry's, else `*`'s, else 0 (not acceptable); q=0
      refuses; x-gzip is gzip (RFC 9110 8.4.1.3);
    - the highest q wins, ties in our order; identity is sent instead only when
      the client lists `identity` with a higher q than every acceptable coding;
    - `identity;q=0` (or `*;q=0`) with no acceptable coding: identity all the same,
      as nginx and most servers do, rather than a 406 page the client cannot use.

    An entry whose q is not a valid qvalue (0 to 1, three decimals) is ignored.
    """
    if not accept_encoding:
        return None
    weights: dict[bytes, float] = {}
    for value in accept_encoding:
        for item in value.split(b","):
            coding, _, params = item.partition(b";")
            coding = coding.strip().lower()
            if not coding:
                continue
            q = _qvalue(params)
            if q is None:
                continue
            if coding == b"x-gzip":
                coding = b"gzip"
            weights[coding] = max(q, weights.get(coding, q))  # listed twice: the kinder
    star = weights.get(b"*", 0.0)
    best, best_q = None, 0.0
    for coding in offered:
        q = weights.get(coding, star)
        if q > best_q:
            best, best_q = coding, q
    if best is not None and weights.get(b"identity", 0.0) > best_q:
        return None
    return best


def _qvalue(params: bytes) -> float | None:
    """The q of an Accept-Encoding element's parameters (1 when absent), or None
    when it is malformed (RFC 9110 12.4.2: "0" to "1", up to three decimals)."""
    q = 1.0
    for param in params.split(b";"):
        name, _, value = param.partition(b"=")
        if name.strip().lower() == b"q":
            if not _QVALUE.match(value.strip()):
                return None
            q = float(value)
    return q


_QVALUE = re.compile(rb"(?:0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?)\Z")


def _values(headers: Iterable[Header], name: bytes) -> list[bytes]:
    return [v for n, v in headers if n.lower() == name]


def _tokens(values: Iterable[bytes]) -> set[bytes]:
    return {t.strip().split(b"=", 1)[0].lower() for v in values for t in v.split(b",")}


def _add_vary(headers: list[Header]) -> None:
    """`Vary: Accept-Encoding`, merged into the Vary the response has (one field
    kept one field; `*` and an Accept-Encoding already there left as they are)."""
    tokens = _tokens(_values(headers, b"vary"))
    if b"*" in tokens or b"accept-encoding" in tokens:
        return
    for i, (name, value) in enumerate(headers):
        if name.lower() == b"vary" and value.strip():
            headers[i] = (name, value.rstrip() + b", Accept-Encoding")
            return
    headers[:] = [(n, v) for n, v in headers if n.lower() != b"vary"]
    headers.append((b"vary", b"Accept-Encoding"))
