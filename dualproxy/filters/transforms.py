"""Body transforms for users: rewrite response and request bodies as they stream.

The chain (chain.py) runs `BodyTransform`s: `feed(chunk) -> bytes` for each
chunk as it arrives, `finish() -> bytes` once at the end (what a transform held
back). This module builds the filters that install them, so a user writes the
least code:

- `body_filter(func, types=..., decode=...)`: `func(chunk) -> bytes` on every
  chunk of the response bodies of those media types (`request_body_filter`: of
  the request bodies);
- `ResponseBodyFilter(make, ...)` / `RequestBodyFilter(make, ...)`: `make()`
  returns a fresh transform per exchange (a class with `feed`/`finish` keeping
  its own state); or subclass and override `transform(exchange, head)`;
- `Buffered(edit, limit=...)`: whole-document edits (JSON): the body is
  collected up to `limit` bytes, then `edit(whole) -> bytes`; a larger body
  passes through untouched (see `Buffered`);
- `SubFilter({b"from": b"to"}, ...)`: nginx's `sub_filter`, text replacement
  that works across chunk boundaries.

`decode=True` asks for the body decoded first (gzip, deflate, br, zstd): it goes
on decoded, without its Content-Encoding. Framing is the chain's: a transform
that may change the length drops Content-Length and weakens a strong ETag; a
206 part, a HEAD answer, a 204 or a 304 is never transformed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, TypeAlias

from ..config import check_types
from ..core import ResponseHead
from ..headers import Header
from .base import BodyTransform, Exchange, Filter

if TYPE_CHECKING:
    from ..config import ProxyConfig

__all__ = [
    "Buffered", "BufferedBody", "Mapped", "Replace", "RequestBodyFilter", "ResponseBodyFilter",
    "SubFilter", "body_filter", "media_type", "request_body_filter",
]

#: A replacement table: patterns to replacements, bytes or str (str as UTF-8).
Table: TypeAlias = Mapping[bytes, bytes] | Mapping[str, str] | Mapping[bytes | str, bytes | str]

#: The media types SubFilter rewrites unless told otherwise (nginx's sub_filter_types).
TEXT_TYPES = ("text/html",)


def media_type(headers: Iterable[Header]) -> str | None:
    """The Content-Type's media type, lower-cased, without parameters (None: none)."""
    for name, value in headers:
        if name.lower() == b"content-type":
            return value.split(b";", 1)[0].strip().decode("latin-1").lower() or None
    return None


def _types(types: Iterable[str] | str | None) -> tuple[str, ...] | None:
    return None if types is None else check_types(types)


def type_matches(types: tuple[str, ...] | None, headers: Iterable[Header]) -> bool:
    """Does the Content-Type match one of `types` (`text/*` and `*/*` allowed)?
    None matches every body, typed or not; a body without a type matches only `*/*`."""
    if types is None:
        return True
    found = media_type(headers)
    if found is None:
        return "*/*" in types
    major = found.split("/", 1)[0]
    return any(t in (found, "*/*") or t == f"{major}/*" for t in types)


def _encoded(headers: Iterable[Header]) -> bool:
    return any(name.lower() == b"content-encoding"
               and value.strip().lower() not in (b"", b"identity") for name, value in headers)


# -- transforms -------------------------------------------------------------------------


def _bytes(value: object, what: str) -> bytes:
    """A user function's result as bytes; anything else fails the exchange (TypeError)."""
    if type(value) is bytes:
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{what} returned {type(value).__name__}, expected bytes")


class Mapped:
    """`func(chunk) -> bytes` on every chunk: a stateless transform."""

    __slots__ = ("func",)

    def __init__(self, func: Callable[[bytes], bytes]) -> None:
        self.func = func

    def feed(self, chunk: bytes) -> bytes:
        return _bytes(self.func(chunk), "a body_filter function")

    def finish(self) -> bytes:
        return b""


class BufferedBody:
    """Collects the body up to `limit` bytes, then gives `edit(whole)` at the end.

    A body longer than `limit` is not edited: what was held goes on as it came,
    then the rest chunk by chunk, untouched (the held bytes are never more than
    `limit`)."""

    __slots__ = ("edit", "limit", "_held", "_size", "_over")

    def __init__(self, edit: Callable[[bytes], bytes], limit: int) -> None:
        if limit < 0:
            raise ValueError("a Buffered limit is a byte count >= 0")
        self.edit = edit
        self.limit = limit
        self._held: list[bytes] = []
        self._size = 0
        self._over = False

    @property
    def passing(self) -> bool:
        """True once the body went over the limit (it passes through untouched)."""
        return self._over

    def feed(self, chunk: bytes) -> bytes:
        if self._over:
            return chunk
        self._size += len(chunk)
        if self._size <= self.limit:
            self._held.append(chunk)
            return b""
        self._over = True
        held, self._held = self._held, []
        return b"".join((*held, chunk))

    def finish(self) -> bytes:
        if self._over:
            return b""
        whole, self._held = b"".join(self._held), []
        return _bytes(self.edit(whole), "a Buffered edit")


class Replace:
    """Replaces every occurrence of the mapping's keys by their values in a
    stream, across chunk boundaries.

    Matching is leftmost, then longest: at the earliest position where some key
    starts, the longest key starting there wins, and the search goes on after it
    (replaced text is never searched again). The result is exactly that of the
    same replacement on the whole body at once. To see a key split between two
    chunks, at most len(longest key) - 1 bytes are held back at a chunk's end,
    from the first that may begin a key, and sent with the next chunk or at the
    end: a chunk ending in text that begins no key goes on whole.
    """

    __slots__ = ("_table", "_keep", "_held")

    def __init__(self, mapping: Table | Replacements) -> None:
        self._table = mapping if isinstance(mapping, Replacements) else Replacements(mapping)
        self._keep = self._table.longest - 1  # the most bytes held back
        self._held = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._held + chunk if self._held else chunk
        end = len(data)
        # A key starting before `tail` ends inside `data`: a match there is final.
        # From `tail` on, a key may be cut by the chunk's end.
        tail = end - self._keep
        table = self._table
        out: list[bytes] = []
        pos = 0
        cut: int | None = None
        for start, key in table.matches(data):
            if start >= tail:
                cut = table.partial(data, max(pos, tail), start + 1)
                if cut is not None:
                    break  # a longer key, or an earlier one, may go on in the next chunk
            out += (data[pos:start], table.mapping[key])
            pos = start + len(key)
        else:
            cut = table.partial(data, max(pos, tail), end)
        cut = end if cut is None else cut
        out.append(data[pos:cut])
        self._held = data[cut:]
        return b"".join(out)

    def finish(self) -> bytes:
        held, self._held = self._held, b""
        return self._table.replace(held)


class Replacements:
    """A checked replacement table (bytes keys, str encoded as UTF-8), prepared once
    for every exchange of a filter: how to find the leftmost-longest matches."""

    __slots__ = ("mapping", "longest", "prefixes", "firsts", "_ordered", "_pattern")

    #: Up to this many keys, `bytes.find` per key (C speed, a few GB/s); above it, one
    #: regular expression (Python's `re` scans at some tens of MB/s).
    FIND_KEYS = 16

    def __init__(self, mapping: Table) -> None:
        table: dict[bytes, bytes] = {}
        for key, value in dict(mapping).items():
            key_b, value_b = _utf8(key, "pattern"), _utf8(value, "replacement")
            if not key_b:
                raise ValueError("a replacement's pattern must not be empty")
            table[key_b] = value_b
        if not table:
            raise ValueError("a replacement table needs at least one pattern")
        self.mapping = table
        # Longest first: of the keys found at one position, the first wins.
        self._ordered = sorted(table, key=len, reverse=True)
        self.longest = len(self._ordered[0])
        # Python's alternation tries its branches in order: longest first too.
        self._pattern = (re.compile(b"|".join(re.escape(k) for k in self._ordered))
                         if len(table) > self.FIND_KEYS else None)
        # The beginnings of keys: a partial match at a chunk's end.
        self.prefixes = frozenset(k[:n] for k in table for n in range(1, len(k)))
        self.firsts = frozenset(k[0] for k in table)

    def matches(self, data: bytes) -> Iterator[tuple[int, bytes]]:
        """(start, key) of each leftmost-longest match in `data`, left to right, the
        search going on after each match."""
        if self._pattern is not None:
            for match in self._pattern.finditer(data):
                yield match.start(), match.group()
            return
        ordered = self._ordered
        found = [data.find(key) for key in ordered]
        pos = 0
        while True:
            best, best_key = -1, b""
            for n, key in enumerate(ordered):
                at = found[n]
                if 0 <= at < pos:  # overlapped by the last match: look again after it
                    at = found[n] = data.find(key, pos)
                if at >= 0 and (best < 0 or at < best):
                    best, best_key = at, key
            if best < 0:
                return
            yield best, best_key
            pos = best + len(best_key)

    def replace(self, data: bytes) -> bytes:
        """The replacement on a whole body."""
        out: list[bytes] = []
        pos = 0
        for start, key in self.matches(data):
            out += (data[pos:start], self.mapping[key])
            pos = start + len(key)
        out.append(data[pos:])
        return b"".join(out)

    def partial(self, data: bytes, begin: int, stop: int) -> int | None:
        """The first position in [begin, stop) whose rest of `data` begins a key
        longer than that rest (None: none)."""
        for position in range(begin, min(stop, len(data))):
            if data[position] in self.firsts and data[position:] in self.prefixes:
                return position
        return None


def _utf8(value: bytes | str, what: str) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    raise TypeError(f"a {what} is bytes or str, not {type(value).__name__}")


# -- filters ----------------------------------------------------------------------------


class ResponseBodyFilter(Filter):
    """Installs a fresh transform on each response body whose type matches.

    `make`: returns the transform for one exchange (a class with `feed` and
    `finish` keeping its state, or any callable); or subclass and override
    `transform(exchange, head)`, which may also return None to leave a body.
    `types`: media types (`text/html`, `text/*`; None: every body). `decode`:
    decode the body first (gzip, deflate, br, zstd); a body in a coding this
    process cannot decode then passes untouched. Without `decode` the transform
    sees the bytes as the upstream sent them, encoded or not.
    """

    types: tuple[str, ...] | None = None
    decode: bool = False

    def __init__(self, make: Callable[[], BodyTransform] | None = None, *,
                 types: Iterable[str] | str | None = None, decode: bool = False) -> None:
        self._make = make
        self.types = _types(types)
        self.decode = decode

    def applies(self, exchange: Exchange, head: ResponseHead) -> bool:
        """Is this response's body one to transform? (The types, by default.)"""
        return type_matches(self.types, head.headers)

    def transform(self, exchange: Exchange, head: ResponseHead) -> BodyTransform | None:
        """The transform for this exchange's response body (None: leave it)."""
        if self._make is None:
            raise NotImplementedError(f"{self.label()}: give `make` or override transform()")
        return self._make()

    def on_response(self, exchange: Exchange, head: ResponseHead) -> None:
        if not self.applies(exchange, head):
            return None
        transform = self.transform(exchange, head)
        if transform is not None:
            exchange.transform_response(transform, decode=self.decode)
        return None


class RequestBodyFilter(Filter):
    """Installs a fresh transform on each request body whose type matches (the
    upstream request is then chunked). Request bodies are never decoded: the
    transform sees the bytes as the client sent them."""

    types: tuple[str, ...] | None = None

    def __init__(self, make: Callable[[], BodyTransform] | None = None, *,
                 types: Iterable[str] | str | None = None) -> None:
        self._make = make
        self.types = _types(types)

    def applies(self, exchange: Exchange) -> bool:
        plan = exchange.plan
        return plan is not None and type_matches(self.types, plan.headers)

    def transform(self, exchange: Exchange) -> BodyTransform | None:
        """The transform for this exchange's request body (None: leave it)."""
        if self._make is None:
            raise NotImplementedError(f"{self.label()}: give `make` or override transform()")
        return self._make()

    def on_request(self, exchange: Exchange) -> None:
        if exchange.plan is None or not exchange.plan.has_body or not self.applies(exchange):
            return None
        transform = self.transform(exchange)
        if transform is not None:
            exchange.transform_request(transform)
        return None


def body_filter(func: Callable[[bytes], bytes], *, types: Iterable[str] | str | None = None,
                decode: bool = False) -> ResponseBodyFilter:
    """A filter mapping every chunk of matching response bodies through `func`.

    `func` sees chunks as they arrive (their boundaries are the network's): for a
    change that must see text across chunks, use `SubFilter` or `Buffered`."""
    flt = ResponseBodyFilter(lambda: Mapped(func), types=types, decode=decode)
    flt.name = f"body_filter({getattr(func, '__qualname__', func)!s})"
    return flt


def request_body_filter(func: Callable[[bytes], bytes], *,
                        types: Iterable[str] | str | None = None) -> RequestBodyFilter:
    """A filter mapping every chunk of matching request bodies through `func`."""
    flt = RequestBodyFilter(lambda: Mapped(func), types=types)
    flt.name = f"request_body_filter({getattr(func, '__qualname__', func)!s})"
    return flt


class Buffered(ResponseBodyFilter):
    """Whole-document edits: `edit(body) -> bytes` on matching response bodies of
    at most `limit` bytes (after decoding, with `decode=True`).

    Above the limit the body passes through untouched, decided as early as it
    can be:

    - the upstream announced a Content-Length above `limit` (the encoded length,
      with `decode`): decided at the head, nothing is installed, the response
      goes on exactly as the upstream sent it, framing and ETag included;
    - no Content-Length (chunked, or ended by the close), or a decoded body
      growing past the limit: the bytes held so far are sent as they came,
      then the rest, untouched (decoded, with `decode`). The head is gone
      already by then: it has no Content-Length and a weak ETag, as for any
      transformed body.

    An `edit` that raises aborts the response (its head is sent already): return
    the body unchanged to leave it as it is (e.g. when it is not valid JSON).
    """

    def __init__(self, edit: Callable[[bytes], bytes], *, limit: int = 1 << 20,
                 types: Iterable[str] | str | None = None, decode: bool = False) -> None:
        if limit < 0:
            raise ValueError("a Buffered limit is a byte count >= 0")
        super().__init__(types=types, decode=decode)
        self.edit = edit
        self.limit = limit
        self.name = f"Buffered({getattr(edit, '__qualname__', edit)!s})"

    def applies(self, exchange: Exchange, head: ResponseHead) -> bool:
        if not super().applies(exchange, head):
            return False
        length = _content_length(head.headers)
        return length is None or length <= self.limit

    def transform(self, exchange: Exchange, head: ResponseHead) -> BodyTransform:
        return BufferedBody(self.edit, self.limit)


def _content_length(headers: Iterable[Header]) -> int | None:
    for name, value in headers:
        if name.lower() == b"content-length":
            text = value.strip()
            return int(text) if text.isdigit() else None
    return None


class SubFilter(ResponseBodyFilter):
    """nginx's `sub_filter`: replace text in matching response bodies as they stream.

    `replacements`: `{pattern: replacement}` (bytes, or str as UTF-8); every
    occurrence is replaced (nginx's `sub_filter_once off`), leftmost then longest,
    a match split between two chunks included (`Replace`). `types`: the media
    types rewritten (default `text/html`, as nginx's `sub_filter_types`).
    `decode` (default True): an encoded body (gzip, deflate, br, zstd) is decoded
    first and goes on decoded; with `decode=False` an encoded body is left as it
    is (text cannot be found in compressed bytes).
    """

    def __init__(self, replacements: Table, *,
                 types: Iterable[str] | str | None = TEXT_TYPES, decode: bool = True) -> None:
        super().__init__(types=types, decode=decode)
        self.table = Replacements(replacements)
        self.name = "SubFilter"

    def applies(self, exchange: Exchange, head: ResponseHead) -> bool:
        if not self.decode and _encoded(head.headers):
            return False
        return super().applies(exchange, head)

    def transform(self, exchange: Exchange, head: ResponseHead) -> BodyTransform:
        return Replace(self.table)


def sub_filter(config: ProxyConfig) -> SubFilter | None:
    """The SubFilter of a route's `sub_filter` option (`--sub-filter FROM=TO`, a
    config file's `sub_filter` table), or None when it has none."""
    if not config.sub_filter:
        return None
    return SubFilter(dict(config.sub_filter), types=config.sub_filter_types or TEXT_TYPES)
