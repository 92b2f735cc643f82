"""RFC 9111 as a shared cache, written as pure functions over header lists.

Nothing here does I/O or keeps state: the filter (filter.py) asks these
functions whether a response may be stored, how old and how fresh a stored
response is, whether a request may be answered from it, and builds the
headers it sends. Times are POSIX seconds (floats); the caller passes `now`.

Sources: RFC 9111 (HTTP Caching), RFC 5861 (stale-while-revalidate,
stale-if-error), RFC 9211 (Cache-Status), RFC 9213 (CDN-Cache-Control, the
targeted field a reverse proxy in front of an origin reads), RFC 9110 for
dates, validators and conditional requests. hishel's 2.x state machine was
read first (see docs/caching.md for why it is not used as is).
"""

from __future__ import annotations

import calendar
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ...headers import Header

# RFC 9111 1.2.2: a delta-seconds too large to hold is taken as 2^31.
MAX_DELTA = 2147483648
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
# RFC 9110 15.1: statuses whose responses are heuristically cacheable.
HEURISTIC_STATUSES = frozenset({200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501})
# The final statuses this cache understands (RFC 9111 5.2.2.3 must-understand).
UNDERSTOOD_STATUSES = frozenset({
    200, 203, 204, 300, 301, 302, 303, 307, 308, 400, 403, 404, 405, 410, 414,
    500, 501, 502, 503, 504})
# Statuses a cache may store at all here (206 parts and 304 are not whole responses).
STORABLE_STATUSES = frozenset(range(200, 600)) - {206, 304}
# RFC 9111 3.1: never stored (hop-by-hop are dropped before the filter sees them).
UNSTORED_FIELDS = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
    b"proxy-authentication-info", b"proxy-authorization", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"age", b"cache-status"})
# RFC 9111 4.3.4: fields a 304 never updates (the stored body's own framing).
NOT_UPDATED_BY_304 = frozenset({
    b"content-length", b"content-encoding", b"content-range", b"transfer-encoding",
    b"age", b"cache-status"})
# The heuristic: 10% of the time since Last-Modified (RFC 9111 4.2.2), at most a day.
HEURISTIC_FRACTION = 0.1
HEURISTIC_MAX = 86400.0


# -- field parsing ------------------------------------------------------------------------

def values(headers: Iterable[Header], name: bytes) -> list[bytes]:
    """Every field line named `name` (lower-case), in order."""
    return [v for n, v in headers if n.lower() == name]


def first(headers: Iterable[Header], name: bytes) -> bytes | None:
    for n, v in headers:
        if n.lower() == name:
            return v
    return None


def split_list(text: bytes) -> list[bytes]:
    """A comma-separated list, commas inside quoted strings kept (RFC 9110 5.6.1)."""
    out: list[bytes] = []
    current = bytearray()
    quoted = escaped = False
    for byte in text:
        char = bytes((byte,))
        if escaped:
            escaped = False
        elif quoted and char == b"\\":
            escaped = True
        elif char == b'"':
            quoted = not quoted
        elif char == b"," and not quoted:
            out.append(bytes(current).strip())
            current.clear()
            continue
        current += char
    out.append(bytes(current).strip())
    return [item for item in out if item]


_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")


class Directives(dict[str, "str | None"]):
    """Cache-Control directives: lower-case name -> value (None: no value). The
    first occurrence of a directive wins (RFC 9111 4.2.1)."""

    @classmethod
    def parse(cls, lines: Sequence[bytes]) -> Directives:
        out = cls()
        for line in lines:
            for item in split_list(line):
                name, eq, value = item.partition(b"=")
                if not _TOKEN.match(name):
                    continue  # `max-age =1`, junk: not a directive this cache knows
                key = name.decode("ascii").lower()
                if key in out:
                    continue
                text: str | None = None
                if eq:
                    raw = value
                    if raw.startswith(b'"') and raw.endswith(b'"') and len(raw) >= 2:
                        raw = re.sub(rb"\\(.)", rb"\1", raw[1:-1])
                    text = raw.decode("latin-1")
                out[key] = text
        return out

    def seconds(self, name: str) -> int | None:
        """A delta-seconds directive: None when absent; -1 when present but invalid
        (a cache must then treat the response as stale)."""
        if name not in self:
            return None
        return delta_seconds(self[name])

    def fields(self, name: str) -> frozenset[bytes] | None:
        """`no-cache="a, b"` / `private="a"`: the listed fields (None: unqualified)."""
        value = self.get(name)
        if not value:
            return None
        return frozenset(f.strip().lower().encode("latin-1")
                         for f in value.split(",") if f.strip())


def delta_seconds(text: str | bytes | None) -> int:
    """RFC 9111 1.2.2: digits only; too large is 2^31; anything else is -1."""
    if text is None:
        return -1
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    if not text or not text.isascii() or not text.isdigit():
        return -1
    return min(int(text), MAX_DELTA)


_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_LONG_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_MONTHS = {m: i for i, m in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), 1)}
_IMF = re.compile(r"([a-z]{3}), (\d\d) ([a-z]{3}) (\d{4}) (\d\d):(\d\d):(\d\d) gmt\Z")
_RFC850 = re.compile(r"([a-z]{6,9}), (\d\d)-([a-z]{3})-(\d\d) (\d\d):(\d\d):(\d\d) gmt\Z")
_ASCTIME = re.compile(r"([a-z]{3}) ([a-z]{3}) ([ \d]\d) (\d\d):(\d\d):(\d\d) (\d{4})\Z")


def parse_date(value: bytes | None) -> float | None:
    """An HTTP-date (RFC 9110 5.6.7: IMF-fixdate, RFC 850, asctime; names in any
    case), as POSIX seconds; None when absent or invalid."""
    if value is None:
        return None
    text = value.decode("latin-1").strip().lower()
    fields: tuple[str, ...]
    match = _IMF.match(text)
    if match:
        day, mday, month, year, hh, mm, ss = match.groups()
        if day not in _DAYS:
            return None
    else:
        match = _RFC850.match(text)
        if match:
            day, mday, month, yy, hh, mm, ss = match.groups()
            if day not in _LONG_DAYS:
                return None
            # RFC 9110 5.6.7: a two-digit year more than 50 years ahead is in the past.
            this_year = time.gmtime().tm_year
            full = this_year // 100 * 100 + int(yy)
            year = str(full - 100 if full > this_year + 50 else full)
        else:
            match = _ASCTIME.match(text)
            if not match:
                return None
            day, month, mday, hh, mm, ss, year = match.groups()
            if day not in _DAYS:
                return None
    fields = (year, mday.strip(), hh, mm, ss)
    if month not in _MONTHS:
        return None
    try:
        y, d, h, m, s = (int(f) for f in fields)
        if not (1 <= d <= 31 and h < 24 and m < 60 and s < 61):
            return None
        return float(calendar.timegm((y, _MONTHS[month], d, h, m, s, 0, 0, 0)))
    except (ValueError, OverflowError):
        return None


def http_date(seconds: float) -> bytes:
    from email.utils import formatdate

    return formatdate(seconds, usegmt=True).encode("ascii")


# -- the response's rules ---------------------------------------------------------------

@dataclass
class ResponseRules:
    """What a response's fields say about caching it, parsed once."""

    cc: Directives
    # CDN-Cache-Control (RFC 9213), when present and valid: it replaces Cache-Control
    # for this cache's storing and freshness decisions.
    targeted: bool
    expires: list[bytes]
    last_modified: float | None

    @classmethod
    def of(cls, headers: Sequence[Header]) -> ResponseRules:
        cdn = values(headers, b"cdn-cache-control")
        targeted = cdn_directives(cdn)
        cc = targeted if targeted is not None else Directives.parse(
            values(headers, b"cache-control"))
        return cls(cc=cc, targeted=targeted is not None,
                   expires=values(headers, b"expires"),
                   last_modified=parse_date(first(headers, b"last-modified")))


_SF_KEY = re.compile(r"[a-z*][a-z0-9_\-.*]*\Z")
_SF_INTEGER = re.compile(r"-?\d{1,15}\Z")
_SF_TOKEN = re.compile(r"[A-Za-z*][!#$%&'*+\-.^_`|~0-9A-Za-z:/]*\Z")


def cdn_directives(lines: Sequence[bytes]) -> Directives | None:
    """CDN-Cache-Control as a Structured Fields dictionary (RFC 9213 2.1, RFC 8941):
    None when absent or invalid (then it is ignored)."""
    if not lines:
        return None
    out = Directives()
    for item in split_list(b",".join(lines)):
        name, eq, value = item.partition(b"=")
        key = name.decode("latin-1")
        if not _SF_KEY.match(key):
            return None
        text = value.decode("latin-1")
        if not eq:
            parsed: str | None = None
        elif _SF_INTEGER.match(text):
            parsed = text
        elif text in ("?0", "?1") or _SF_TOKEN.match(text):
            parsed = text
        elif len(text) >= 2 and text[0] == text[-1] == '"':
            parsed = text[1:-1]
        else:
            return None  # a type this parser does not know: the field is invalid
        if key in ("max-age", "s-maxage", "stale-while-revalidate", "stale-if-error") \
                and (not eq or not _SF_INTEGER.match(text)):
            return None  # the wrong type for a known directive
        out.setdefault(key, parsed)
    return out


def status_understood(status: int) -> bool:
    return status in UNDERSTOOD_STATUSES


def storable(method: str, status: int, rules: ResponseRules, request_cc: Directives,
             request_has_authorization: bool) -> str | None:
    """RFC 9111 3 (and 3.5) for a shared cache: None when the response may be stored,
    else the reason it may not (for logs and Cache-Status's `detail`)."""
    cc = rules.cc
    if method != "GET":
        return "method"
    if status not in STORABLE_STATUSES:
        return "status"
    if "must-understand" in cc and cc.get("must-understand") is None:
        if not status_understood(status):
            return "must-understand"
        # RFC 9111 5.2.2.3: a cache that understands the status ignores no-store.
    elif "no-store" in cc:
        return "no-store"
    if "no-store" in request_cc:
        return "request no-store"
    if "private" in cc:
        return "private"
    if request_has_authorization and not (
            "public" in cc or "must-revalidate" in cc or "s-maxage" in cc):
        return "authorization"
    explicit = ("public" in cc or "max-age" in cc or "s-maxage" in cc
                or (bool(rules.expires) and not rules.targeted))
    if not explicit and status not in HEURISTIC_STATUSES:
        return "no freshness"
    return None


def freshness_lifetime(status: int, rules: ResponseRules, date: float) -> float:
    """RFC 9111 4.2.1 for a shared cache: s-maxage, max-age, Expires - Date, then the
    heuristic (4.2.2); an invalid value makes the response stale (0)."""
    cc = rules.cc
    for name in ("s-maxage", "max-age"):
        seconds = cc.seconds(name)
        if seconds is not None:
            return float(max(seconds, 0))
    if rules.expires and not rules.targeted:
        if len(rules.expires) > 1:
            return 0.0
        expires = parse_date(rules.expires[0])
        if expires is None:
            return 0.0
        return max(0.0, expires - date)
    if rules.last_modified is not None and (status in HEURISTIC_STATUSES or "public" in cc):
        return min(HEURISTIC_MAX, max(0.0, (date - rules.last_modified) * HEURISTIC_FRACTION))
    return 0.0


def age_value(headers: Sequence[Header]) -> int:
    """The Age field: the first member of the first line, digits only (else 0)."""
    line = first(headers, b"age")
    if line is None:
        return 0
    members = split_list(line)
    if not members:
        return 0
    seconds = delta_seconds(members[0])
    return seconds if seconds >= 0 else 0


def initial_age(headers: Sequence[Header], date: float, request_time: float,
                response_time: float) -> float:
    """RFC 9111 4.2.3's corrected_initial_age, when the response arrived."""
    apparent = max(0.0, response_time - date)
    corrected = age_value(headers) + (response_time - request_time)
    return max(apparent, corrected)


def must_revalidate_when_stale(cc: Directives) -> bool:
    """Stale may never be served (RFC 9111 4.2.4, 5.2.2.2, 5.2.2.8, 5.2.2.10)."""
    return ("must-revalidate" in cc or "proxy-revalidate" in cc or "s-maxage" in cc
            or "no-cache" in cc)


# -- the request's rules ------------------------------------------------------------------

def request_directives(headers: Sequence[Header]) -> Directives:
    """Cache-Control of a request; `Pragma: no-cache` counts as `no-cache` only when
    the request has no Cache-Control (RFC 9111 5.4)."""
    return directives_of(values(headers, b"cache-control"), values(headers, b"pragma"))


def directives_of(cache_control: Sequence[bytes], pragma: Sequence[bytes]) -> Directives:
    """`request_directives` of a request's Cache-Control and Pragma lines, found already."""
    if cache_control:
        return Directives.parse(cache_control)
    out = Directives()
    for line in pragma:
        if any(item.lower() == b"no-cache" for item in split_list(line)):
            out["no-cache"] = None
    return out


@dataclass
class Reuse:
    """How a stored response may answer a request (RFC 9111 4 and RFC 5861)."""

    fresh: bool          # within its freshness lifetime and the request's limits
    stale_ok: bool       # stale, and the request allows it (max-stale)
    swr: bool            # stale within stale-while-revalidate: answer, refresh behind
    validate: bool       # must be validated first (no-cache, stale, request no-cache)
    ttl: float           # freshness remaining (negative: stale for that long)


def judge(stored_cc: Directives, lifetime: float, age: float, request_cc: Directives) -> Reuse:
    """Decide a stored response's use for a request."""
    ttl = lifetime - age
    fresh = ttl > 0
    if fresh:
        max_age = request_cc.seconds("max-age")
        if max_age is not None and max_age >= 0 and age > max_age:
            fresh = False
        min_fresh = request_cc.seconds("min-fresh")
        if min_fresh is not None and min_fresh >= 0 and ttl < min_fresh:
            fresh = False
    if "no-cache" in request_cc or stored_cc.get("no-cache", "x") is None:
        # `no-cache` with no field list: validate on every use.
        return Reuse(False, False, False, True, ttl)
    if fresh:
        return Reuse(True, False, False, False, ttl)
    stale_ok = swr = False
    if not must_revalidate_when_stale(stored_cc):
        if "max-stale" in request_cc:
            limit = request_cc["max-stale"]
            allowed = MAX_DELTA if limit is None else delta_seconds(limit)
            stale_ok = allowed >= 0 and -ttl <= allowed
        window = stored_cc.seconds("stale-while-revalidate")
        if window is not None and window > 0 and -ttl <= window and ttl <= 0:
            swr = True
    return Reuse(False, stale_ok, swr, True, ttl)


def stale_if_error(stored_cc: Directives, request_cc: Directives, ttl: float) -> bool:
    """RFC 5861 4: may a stale response answer when the origin fails?"""
    if must_revalidate_when_stale(stored_cc):
        return False
    for cc in (request_cc, stored_cc):
        seconds = cc.seconds("stale-if-error")
        if seconds is not None and seconds >= 0 and -ttl <= seconds:
            return True
    return False


# -- stored fields --------------------------------------------------------------------------

def fields_to_store(headers: Sequence[Header], cc: Directives) -> list[Header]:
    """The response fields a cache keeps (RFC 9111 3.1): no connection-specific
    fields, none a qualified `no-cache`/`private` names, no framing (the store
    knows the body's length), lower-case names."""
    dropped = set(UNSTORED_FIELDS) | {b"content-length"}
    for name in ("no-cache", "private"):
        listed = cc.fields(name)
        if listed:
            dropped |= listed
    return [(n.lower(), v) for n, v in headers if n.lower() not in dropped]


def freshen(stored: Sequence[Header], update: Sequence[Header]) -> list[Header]:
    """RFC 9111 3.2/4.3.4: the stored fields updated by a 304's (or HEAD's) fields."""
    replacing = {n.lower() for n, _ in update} - NOT_UPDATED_BY_304 - UNSTORED_FIELDS
    kept = [(n, v) for n, v in stored if n not in replacing]
    return kept + [(n.lower(), v) for n, v in update if n.lower() in replacing]


# -- validators and conditional requests ------------------------------------------------------

def etag_matches(tags: bytes, etag: bytes | None) -> bool:
    """If-None-Match's weak comparison (RFC 9110 13.1.2) against a stored ETag."""
    if etag is None:
        return False
    items = split_list(tags)
    if b"*" in items:
        return True
    opaque = _opaque(etag)
    return any(_opaque(item) == opaque for item in items)


def _opaque(tag: bytes) -> bytes:
    tag = tag.strip()
    return tag[2:] if tag[:2] in (b"W/", b"w/") else tag


def not_modified(request: Sequence[Header], stored: Sequence[Header],
                 date: float | None = None) -> bool | None:
    """The client's own conditional against a stored response (RFC 9110 13.2.2; `date`:
    its Date, the modification time when it has no Last-Modified): True: answer 304;
    False: answer in full; None: the request is not conditional."""
    inm = values(request, b"if-none-match")
    ims = first(request, b"if-modified-since")
    if not inm and ims is None:
        return None
    modified = parse_date(first(stored, b"last-modified"))
    return conditional(inm, ims, first(stored, b"etag"), date if modified is None else modified)


def conditional(if_none_match: Sequence[bytes], if_modified_since: bytes | None,
                etag: bytes | None, modified: float | None) -> bool | None:
    """`not_modified` of the request's If-None-Match lines and If-Modified-Since, and
    the stored ETag and modification time (Last-Modified, else Date), found already."""
    if if_none_match:
        return etag_matches(b", ".join(if_none_match), etag)
    since = parse_date(if_modified_since)
    if since is None:
        return None
    return modified is not None and modified <= since


# RFC 9110 15.4.5: the fields a 304 carries from the full response it stands for.
NOT_MODIFIED_FIELDS = frozenset({
    b"cache-control", b"content-location", b"date", b"etag", b"expires", b"vary",
    b"last-modified"})


def validators(stored: Sequence[Header]) -> list[Header]:
    """The fields that make a request conditional on a stored response."""
    out: list[Header] = []
    etag = first(stored, b"etag")
    if etag is not None:
        out.append((b"if-none-match", etag))
    last_modified = first(stored, b"last-modified")
    if last_modified is not None and parse_date(last_modified) is not None:
        out.append((b"if-modified-since", last_modified))
    return out


def same_validator(update: Sequence[Header], stored: Sequence[Header]) -> bool:
    """Does a 304 name this stored response (RFC 9111 4.3.4)?"""
    etag = first(update, b"etag")
    if etag is not None:
        stored_etag = first(stored, b"etag")
        return stored_etag is not None and _opaque(stored_etag) == _opaque(etag)
    last_modified = first(update, b"last-modified")
    if last_modified is not None:
        return last_modified == first(stored, b"last-modified")
    return True


_RANGE = re.compile(rb"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*\Z", re.IGNORECASE)


def byte_range(value: bytes, size: int) -> tuple[int, int] | None:
    """One satisfiable byte range of a `size`-byte body (RFC 9110 14.1.2), as
    (first, last) inclusive; None for anything else (several ranges, another
    unit, unsatisfiable: the origin answers those)."""
    match = _RANGE.match(value)
    if match is None or not (match[1] or match[2]):
        return None
    if not match[1]:  # the last N bytes
        count = int(match[2])
        if count == 0 or size == 0:
            return None
        return max(0, size - count), size - 1
    start = int(match[1])
    end = int(match[2]) if match[2] else size - 1
    if start >= size or end < start:
        return None
    return start, min(end, size - 1)


def cache_status(detail: str) -> Header:
    """An RFC 9211 Cache-Status member for this cache."""
    return (b"cache-status", CACHE_STATUS + detail.encode("ascii"))


CACHE_STATUS = b"dualproxy; "  # this cache's member of Cache-Status, before its detail
# A fresh hit's (`% ttl`, its whole seconds of freshness left): cache_status's, in one step.
FRESH_HIT = CACHE_STATUS + b"hit; ttl=%d"
