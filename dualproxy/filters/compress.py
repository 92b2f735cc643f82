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
from typing import TYPE_CHECKING

from ..config import DEFAULT_MIN_LENGTH, DEFAULT_TYPES, PREFERENCE, Compression
from ..core import ResponseHead
from ..headers import Header
from .base import Exchange, Filter
from .codings import encodable, encoder

if TYPE_CHECKING:
    from ..config import ProxyConfig

# The settings (config.py, which checks them at construction): re-exported here.
__all__ = ["DEFAULT_MIN_LENGTH", "DEFAULT_TYPES", "PREFERENCE", "Compress", "Compression",
           "compress_filter"]


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
