"""The cache filter: answers hits by itself, watches misses stream through.

Per exchange, `on_request` looks the request up (keys.py, store.py) and asks the
policy (policy.py) what a stored response may do for it:

- fresh (or stale the request allows): an `Answer` from the store, with `Age`
  and `Cache-Status: dualproxy; hit` (a 304 when the client's own conditional
  matches it); a HEAD is answered from a stored GET;
- stale with validators: the upstream request becomes conditional on it; a 304
  then freshens the stored fields and the stored body answers
  (`exchange.replace_response_body`), a full response replaces it;
- nothing usable: a miss. A storable response is written to the store as it
  streams to the client (an observer transform), and committed only when its
  body completed (never an aborted one) within the object limit.

An unsafe method's success invalidates the URI and its Location and
Content-Location (RFC 9111 4.4).
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import math
import threading
import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Sequence,
)
from typing import Literal, TypeVar

from ...core import IncomingRequest, ResponseHead, UpstreamPlan
from ...errors import GatewayTimeout, ProxyError
from ...headers import Header
from ..base import Answer, Exchange, Filter
from ..chain import Flow, run_either
from . import policy
from .flight import Flight, Head
from .keys import key_for, same_origin_key, vary_names, vary_values
from .policy import Directives, ResponseRules
from .refresh import Refresher
from .store import (
    SLICE,
    STORE_FAILED,
    Entry,
    MemoryStore,
    Store,
    Writer,
    aclose_store,
    close_store,
)

T = TypeVar("T")

_CONDITIONALS = frozenset({b"if-none-match", b"if-modified-since", b"if-match",
                           b"if-unmodified-since", b"if-range"})


class _Asked:
    """The request fields the cache reads, found in one pass over its headers (the
    names lower-case: IncomingRequest). `plain`: none but Host. What a request
    lacks is the class's default (a plain request sets one attribute)."""

    host: bytes | None = None
    plain = True
    range: bytes | None = None
    authorization: bytes | None = None
    if_modified_since: bytes | None = None
    # Every line of these (tuples: most requests have none)
    cache_control: tuple[bytes, ...] = ()
    pragma: tuple[bytes, ...] = ()
    if_none_match: tuple[bytes, ...] = ()

    def __init__(self, headers: Sequence[Header]) -> None:
        for name, value in headers:
            if name in _ASKED:
                if name == b"host":
                    if self.host is None:
                        self.host = value
                    continue
                self.plain = False
                attribute = _ASKED[name]
                if name in _LISTS:
                    setattr(self, attribute, (*getattr(self, attribute), value))
                elif getattr(self, attribute) is None:  # the first line of the others
                    setattr(self, attribute, value)

    def directives(self) -> Directives:
        if not self.cache_control and not self.pragma:
            return _NO_DIRECTIVES  # (read only, as every request's)
        return policy.directives_of(self.cache_control, self.pragma)

    def conditional(self) -> bool:
        """Does the request carry a conditional a stored 200 may answer with a 304?"""
        return bool(self.if_none_match) or self.if_modified_since is not None


def _plain_host(headers: Sequence[Header]) -> bytes | None | Literal[False]:
    """The first Host value of a request the cache reads no other field of (`_Asked`'s
    `plain`, without making one: a fresh hit's), else False."""
    host = None
    for name, value in headers:
        if name in _ASKED:
            if name != b"host":
                return False
            if host is None:
                host = value
    return host


_NO_DIRECTIVES = Directives()
_LISTS = frozenset({b"cache-control", b"pragma", b"if-none-match"})
_ASKED = {b"host": "host", b"cache-control": "cache_control", b"pragma": "pragma",
          b"range": "range", b"authorization": "authorization",
          b"if-none-match": "if_none_match", b"if-modified-since": "if_modified_since"}


class _Stored:
    """What a hit needs of a stored response, computed once for each version of its
    fields (a 304 replaces them, and its Date) and body length: the rules, the
    freshness lifetime, whether an authorized request may have it (RFC 9111 3.5), the
    validators and the head it is answered with (before Age and Cache-Status)."""

    __slots__ = ("headers", "date", "length", "rules", "lifetime", "no_cache", "shared",
                 "etag", "modified", "head", "fresh_head", "body")

    def __init__(self, entry: Entry) -> None:
        headers = self.headers = entry.headers
        self.date, self.length = entry.date, entry.body_length()
        rules = self.rules = ResponseRules.of(headers)
        cc = rules.cc
        self.lifetime = policy.freshness_lifetime(entry.status, rules, entry.date)
        self.no_cache = cc.get("no-cache", "x") is None  # unqualified: validate each use
        self.shared = "public" in cc or "must-revalidate" in cc or "s-maxage" in cc
        self.etag = policy.first(headers, b"etag")
        modified = policy.parse_date(policy.first(headers, b"last-modified"))
        self.modified = entry.date if modified is None else modified
        self.head = list(headers)
        if entry.status not in (204, 304):
            self.head.append((b"content-length", b"%d" % self.length))
        # A fresh hit's whole head for the last (Age, ttl) seconds it was made for.
        self.fresh_head: tuple[tuple[int, int], list[Header]] | None = None
        # The body a hit answers with as it is (Entry.whole's bytes): one in memory, of
        # one slice at most, that no store reads or streams. None: read it each answer.
        body = entry.body
        self.body = body if type(body) is bytes and entry.loader is None \
            and entry.stream is None and len(body) == self.length <= SLICE else None

    def fresh(self, age: float, ttl: float) -> list[Header]:
        """A fresh hit's head: `head`, Age and Cache-Status (whole seconds), made again
        only when they changed (shared by the hits of that second: the face copies it)."""
        seconds = int(age), int(ttl)
        made = self.fresh_head
        if made is not None and made[0] == seconds:
            return made[1]
        head = [*self.head, (b"age", b"%d" % seconds[0]),
                (b"cache-status", policy.FRESH_HIT % seconds[1])]
        self.fresh_head = seconds, head
        return head


def _stored(entry: Entry) -> _Stored:
    """`entry`'s _Stored, made again when its fields, Date or length changed."""
    view = entry.view
    if view is None or view.headers is not entry.headers or view.date != entry.date \
            or view.length != (entry.length if entry.length >= 0 else len(entry.body)):
        view = entry.view = _Stored(entry)  # (the length: Entry.body_length, inline)
    return view  # type: ignore[no-any-return]


class _Hit(Answer):
    """An answer from the store: its head (the stored one) frames its body."""

    framed = True


class _State:
    """What the cache decided for one exchange (exchange.state[Cache])."""

    __slots__ = ("key", "request_time", "request_cc", "asked", "mode", "entry", "forward",
                 "flight", "writer")

    def __init__(self, key: str, request_time: float, request_cc: Directives,
                 asked: _Asked) -> None:
        self.key, self.request_time, self.request_cc = key, request_time, request_cc
        self.asked = asked
        self.mode = "lookup"                 # lookup | revalidate | invalidate | bypass
        self.entry: Entry | None = None      # the stored response being revalidated
        self.forward = "uri-miss"            # RFC 9211 fwd= for a response from upstream
        self.flight: Flight | None = None    # the fetch this exchange leads (collapsing)
        self.writer: Writer | None = None    # where a miss's body is stored as it streams


class _Recorder:
    """An observer of a miss's body: each chunk to the store's writer as it passes.

    Committed when the body completed: at its last byte when its length is known
    (before the client can ask again), else at `finish` (never for an aborted body)."""

    __slots__ = ("writer", "length", "done", "flight", "exchange", "put")

    def __init__(self, writer: Writer, length: int | None, flight: Flight | None,
                 exchange: Exchange, put: Callable[[Entry], None | Awaitable[None]]) -> None:
        self.writer, self.length, self.done, self.flight = writer, length, False, flight
        self.exchange, self.put = exchange, put

    def feed(self, chunk: bytes) -> bytes:
        if self.flight is not None:
            self.flight.write(self.writer, chunk)  # the followers read the writer's buffer
        else:
            self.writer.write(chunk)
        flushed = self.writer.flush()  # a store that writes bodies as they come (redis)
        if flushed is not None:
            self.exchange.await_in_body(flushed)
        if self.length is not None and self.writer.size >= self.length and not self.done:
            self._complete(self.writer.size == self.length)
        return chunk

    def finish(self) -> bytes:
        if not self.done:
            self._complete(True)
        return b""

    def _complete(self, whole: bool) -> None:
        self.done = True
        entry = self.writer.commit() if whole else None
        if entry is not None:
            stored = self.put(entry)
            if inspect.isawaitable(stored):  # an asyncio store: before the last bytes go
                self.exchange.await_in_body(stored)
            self.exchange.record.cache_stored = self.writer.size
        if self.flight is not None:
            self.flight.end(whole)


class Cache(Filter):
    """An RFC 9111 shared cache in front of the route's upstream."""

    name = "cache"
    # Its answers and heads are stored upstream fields (checked as they came) and its own.
    _valid_heads = True

    def __init__(self, store: Store | None = None, *,
                 store_set_cookie: bool = False,
                 may_purge: Callable[[str | None], bool] = lambda peer: False,
                 refresher: Refresher | None = None) -> None:
        self.store = store if store is not None else MemoryStore()
        # Responses with Set-Cookie are one user's: not stored unless the route says so.
        self.store_set_cookie = store_set_cookie
        # Whether a direct peer may PURGE (config.may_purge): nobody by default.
        self.may_purge = may_purge
        # Fetches stale-while-revalidate answers start (None: such answers wait instead).
        self.refresher = refresher
        # The misses in flight, by key: later misses for a key join them (flight.py).
        self.flights: dict[str, Flight] = {}
        self._flights_lock = threading.Lock()
        # A store whose calls never return an awaitable: a fresh hit needs no flow.
        self._synchronous = getattr(self.store, "synchronous", False) is True
        # Recent requests' keys, by (scheme, Host, target): cleared when full.
        self._keys: dict[tuple[str, bytes | None, bytes], str] = {}

    # -- the request ---------------------------------------------------------------------

    # Each stage is a flow (chain.Flow): a store call's awaitable, from an asyncio
    # store, is yielded and awaited on the async face; with a sync store nothing is.

    def on_request(self, exchange: Exchange) -> Answer | None | Awaitable[Answer | None]:
        if STORE_FAILED.get():  # (a worker thread's context outlives its request)
            STORE_FAILED.set(False)
        incoming = exchange.incoming
        if self._synchronous and incoming.method in _LOOKUPS:
            host = _plain_host(incoming.headers)
            if host is not False:
                answer = self._fresh(exchange, incoming, host)
                if answer is not None:
                    return answer
        return run_either(self._request(exchange, _Asked(incoming.headers)))

    def _key(self, incoming: IncomingRequest, host: bytes | None) -> str:
        """keys.key_for, remembered for the recent requests."""
        memo = (incoming.scheme, host, incoming.target)
        key = self._keys.get(memo)
        if key is None:
            if len(self._keys) >= _KEYS_KEPT:
                self._keys.clear()
            key = self._keys[memo] = key_for(incoming, host)
        return key

    def _fresh(self, exchange: Exchange, incoming: IncomingRequest,
               host: bytes | None) -> Answer | None:
        """A plain GET or HEAD (no request field the cache reads but Host, `host`)
        answered from a synchronous store without a flow, when a stored response is
        fresh for it: `_request`'s answer, in short (None: `_request` decides)."""
        key = self._keys.get((incoming.scheme, host, incoming.target))  # (_key's memo)
        variants: list[Entry] = self.store.get(  # type: ignore[assignment]  # (sync)
            key if key is not None else self._key(incoming, host))
        if not variants:
            return None
        entry = variants[0]
        if entry.vary or len(variants) > 1:
            newest = self._newest(incoming.headers, variants)
            if newest is None:
                return None
            entry = newest
        stored = _stored(entry)
        age = entry.age(time.time())
        ttl = stored.lifetime - age
        if ttl <= 0 or stored.no_cache:
            return None
        body: bytes | Iterable[bytes] | AsyncIterable[bytes] | None = stored.body
        if body is None:  # (not a small body in memory)
            if incoming.method != "HEAD" and self.store.load(entry) is None:
                return None
            body = entry.whole()
        exchange.record.cache = "hit"
        return _Hit(entry.status, stored.fresh(age, ttl), body)

    def _request(self, exchange: Exchange, asked: _Asked) -> Flow[Answer | None]:
        incoming = exchange.incoming
        method = incoming.method
        now = time.time()
        state = _State(self._key(incoming, asked.host), now, asked.directives(), asked)
        exchange.state[Cache] = state
        exchange.record.cache = "bypass"
        if method == "PURGE":
            exchange.record.cache = "purge"
            return (yield from self._purge(exchange, state))
        if method not in ("GET", "HEAD"):
            state.mode = "bypass" if method in policy.SAFE_METHODS else "invalidate"
            state.forward = "method"
            return None
        if asked.range is not None:
            return (yield from self._part(exchange, state, asked.range, now))
        variants = self.store.get(state.key)
        if type(variants) is not list:  # (a sync store's list needs no flow)
            variants = yield from _io(variants)
        entry = self._select(state, incoming.headers, variants)
        if entry is None:
            self._only_if_cached(state)
            # Collapsed: plain GETs only (an authorized one is its user's, RFC 9111 3.5).
            if method == "GET" and state.forward != "request" and not (
                    {"no-cache", "no-store"} & state.request_cc.keys()) \
                    and asked.authorization is None:
                return (yield from _io(self._collapse(exchange, state)))
            return None
        stored = _stored(entry)
        age = entry.age(now)
        ttl = stored.lifetime - age
        if ttl > 0 and not state.request_cc and not stored.no_cache:
            # Fresh, and the request sets no limit: policy.judge's answer, in short.
            return (yield from self._hit(exchange, entry, age, f"hit; ttl={math.floor(ttl)}",
                                         stored))
        reuse = policy.judge(stored.rules.cc, stored.lifetime, age, state.request_cc)
        if reuse.fresh or reuse.stale_ok:
            return (yield from self._hit(exchange, entry, age,
                                         f"hit; ttl={math.floor(reuse.ttl)}"))
        if reuse.swr and self.refresher is not None:
            answer = yield from self._hit(exchange, entry, age,
                                          f"hit; ttl={math.floor(reuse.ttl)}; fwd=stale")
            if answer is not None:  # RFC 5861 3: answer now, refresh behind
                self._refresh(exchange, state, entry)
            return answer
        if "only-if-cached" in state.request_cc:
            return self._only_if_cached(state)
        state.forward = "request" if "no-cache" in state.request_cc else "stale"
        state.entry = entry  # for stale-if-error, validated or not
        conditions = policy.validators(entry.headers)
        if method == "GET" and conditions and exchange.plan is not None:
            plan = exchange.plan
            kept = [(n, v) for n, v in plan.headers if n.lower() not in _CONDITIONALS]
            exchange.plan = _replace_headers(plan, kept + conditions)
            state.mode = "revalidate"
        return None

    # -- collapsing ------------------------------------------------------------------------

    def _collapse(self, exchange: Exchange, state: _State,
                  ) -> Answer | None | Awaitable[Answer | None]:
        """Lead the fetch for this key, or join the one in flight."""
        with self._flights_lock:
            flight = self.flights.get(state.key)
            if flight is None:
                state.flight = self.flights[state.key] = Flight()
                return None
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # the sync face: wait on this worker thread
            return self._follow(exchange, flight, flight.wait_head(), flight.body())
        return self._afollow(exchange, flight)

    async def _afollow(self, exchange: Exchange, flight: Flight) -> Answer | None:
        return self._follow(exchange, flight, await flight.await_head(), flight.abody())

    @staticmethod
    def _follow(exchange: Exchange, flight: Flight, head: Head | None,
                body: Iterator[bytes] | AsyncIterator[bytes]) -> Answer | None:
        """A follower's answer from the leader's head and body, when they fit it."""
        if head is None or vary_values(exchange.incoming.headers, head.vary) != head.selected:
            return None  # up to the upstream itself
        headers = [*head.headers, (b"age", b"0"),
                   policy.cache_status("fwd=uri-miss; collapsed")]
        exchange.record.cache = "collapsed"
        return Answer(head.status, headers, body)

    def _land(self, state: _State) -> None:
        """The leader is over: later misses lead their own fetch."""
        flight = state.flight
        if flight is None:
            return
        flight.end(False)  # a no-op when its body completed
        with self._flights_lock:
            if self.flights.get(state.key) is flight:
                del self.flights[state.key]

    def on_end(self, exchange: Exchange) -> Awaitable[None] | None:
        state = exchange.state.get(Cache)
        aborted = None
        if isinstance(state, _State):
            if state.flight is not None:
                self._land(state)
            if state.writer is not None:  # what an uncommitted body wrote goes (redis)
                aborted = state.writer.abort()
        if STORE_FAILED.get():
            exchange.record.cache_store_failed = True
        return aborted

    def _purge(self, exchange: Exchange, state: _State) -> Flow[Answer]:
        """PURGE: drop every stored variant of the URI (trusted peers only)."""
        if not self.may_purge(exchange.incoming.peer):
            raise ProxyError("PURGE is only accepted from trusted peers", status=405)
        count = yield from _io(self.store.remove(state.key))
        body = json.dumps({"purged": count}).encode()
        return Answer(200 if count else 404,
                      [(b"content-type", b"application/json"),
                       (b"cache-control", b"no-store")], body)

    def _part(self, exchange: Exchange, state: _State, ranged: bytes,
              now: float) -> Flow[Answer | None]:
        """A Range request: one range of a usable stored whole response, else the
        request goes upstream as it is (its 206 is not stored)."""
        state.mode, state.forward = "bypass", "partial"
        headers = exchange.incoming.headers
        if exchange.incoming.method != "GET" or policy.first(headers, b"if-range") is not None:
            return None
        entry = self._select(state, headers, (yield from _io(self.store.get(state.key))))
        if entry is None or entry.status != 200:
            return None
        stored = _stored(entry)
        age = entry.age(now)
        reuse = policy.judge(stored.rules.cc, stored.lifetime, age, state.request_cc)
        span = policy.byte_range(ranged, entry.body_length())
        if not (reuse.fresh or reuse.stale_ok) or span is None:
            return None
        start, end = span
        body = yield from _io(self.store.load(entry))
        if body is None:
            return None
        exchange.record.cache = "hit"
        status = f"hit; ttl={math.floor(reuse.ttl)}"
        head = [(n, v) for n, v in self._stored_head(entry, age, status)
                if n != b"content-length"]
        head += [(b"content-range", b"bytes %d-%d/%d" % (start, end, entry.body_length())),
                 (b"content-length", b"%d" % (end - start + 1))]
        return Answer(206, head, entry.part(start, end))

    @staticmethod
    def _newest(headers: Sequence[Header], variants: list[Entry]) -> Entry | None:
        """The most recent stored variant (of the key's `variants`) a request with
        `headers` selects (RFC 9111 4.1)."""
        if len(variants) == 1:
            only = variants[0]
            return only if not only.vary or vary_values(headers, only.vary) == only.selected \
                else None
        chosen = [e for e in variants
                  if not e.vary or vary_values(headers, e.vary) == e.selected]
        return max(chosen, key=lambda e: (e.date, e.response_time)) if chosen else None

    def _select(self, state: _State, headers: Sequence[Header],
                variants: list[Entry]) -> Entry | None:
        """`_newest`, for this request: not for an authorized one unless shared
        (RFC 9111 3.5); state.forward says why none."""
        if not variants:
            return None
        entry = self._newest(headers, variants)
        if entry is None:
            state.forward = "vary-miss"
            return None
        if state.asked.authorization is not None and not _stored(entry).shared:
            state.forward = "request"  # RFC 9111 3.5: not for an authorized request
            return None
        return entry

    @staticmethod
    def _only_if_cached(state: _State) -> None:
        if "only-if-cached" in state.request_cc:
            raise GatewayTimeout("only-if-cached: no stored response may answer")
        return None

    def _hit(self, exchange: Exchange, entry: Entry, age: float, status: str,
             stored: _Stored | None = None) -> Flow[Answer | None]:
        """The stored response as the answer (None: its body could not be read)."""
        asked = exchange.state[Cache].asked
        if entry.status == 200 and asked.conditional() and self._not_modified(asked, entry):
            headers = [(n, v) for n, v in entry.headers if n in policy.NOT_MODIFIED_FIELDS]
            headers += [(b"age", b"%d" % int(age)), policy.cache_status(status)]
            exchange.record.cache = "stale" if "fwd=stale" in status else "hit"
            return Answer(304, headers)
        if exchange.incoming.method != "HEAD":
            body = self.store.load(entry)
            if type(body) not in _PLAIN:  # (a sync store's body needs no flow)
                body = yield from _io(body)
            if body is None:
                return None  # the store failed to read its body
        exchange.record.cache = "stale" if "fwd=stale" in status else "hit"
        return _Hit(entry.status, self._stored_head(entry, age, status, stored),
                    entry.whole())

    @staticmethod
    def _not_modified(asked: _Asked, entry: Entry) -> bool | None:
        """The client's own conditional against `entry` (policy.not_modified)."""
        stored = _stored(entry)
        return policy.conditional(asked.if_none_match, asked.if_modified_since,
                                  stored.etag, stored.modified)

    def _load(self, exchange: Exchange, entry: Entry) -> Flow[bool]:
        """Read `entry`'s body (not for a HEAD): False when the store failed."""
        if exchange.incoming.method == "HEAD":
            return True
        return (yield from _io(self.store.load(entry))) is not None

    @staticmethod
    def _stored_head(entry: Entry, age: float, status: str,
                     stored: _Stored | None = None) -> list[Header]:
        return [*(stored or _stored(entry)).head, (b"age", b"%d" % int(age)),
                policy.cache_status(status)]

    # -- the response ----------------------------------------------------------------------

    def on_response(self, exchange: Exchange, head: ResponseHead,
                    ) -> ResponseHead | None | Awaitable[ResponseHead | None]:
        return run_either(self._response(exchange, head))

    def _response(self, exchange: Exchange, head: ResponseHead) -> Flow[ResponseHead | None]:
        state = exchange.state.get(Cache)
        if not isinstance(state, _State):
            return None
        now = time.time()
        if state.mode == "invalidate":
            if 200 <= head.status < 400:
                yield from self._invalidate(state.key, head.headers)
            return None
        if state.mode == "bypass":
            return None
        if state.entry is not None:
            answered = yield from self._revalidated(exchange, state, head, now)
            if answered is not None:
                return answered
        return (yield from self._miss(exchange, state, head, now))

    def on_error(self, exchange: Exchange, error: ProxyError,
                 ) -> Answer | None | Awaitable[Answer | None]:
        return run_either(self._error(exchange, error))

    def _error(self, exchange: Exchange, error: ProxyError) -> Flow[Answer | None]:
        """The upstream failed (no head): a stale stored answer, where its fields allow
        one when the origin cannot be reached (RFC 9111 4.2.4, RFC 5861 4)."""
        state = exchange.state.get(Cache)
        if not isinstance(state, _State) or state.entry is None or error.status < 500:
            return None
        entry = state.entry
        stored = _stored(entry)
        if policy.must_revalidate_when_stale(stored.rules.cc):
            return None
        now = time.time()
        age = entry.age(now)
        ttl = stored.lifetime - age
        status = f"hit; ttl={math.floor(ttl)}; fwd=stale; fwd-status={error.status}"
        return (yield from self._hit(exchange, entry, age, status))

    def _invalidate(self, key: str, headers: list[Header]) -> Flow[None]:
        yield from _io(self.store.remove(key))
        for name in (b"location", b"content-location"):
            value = policy.first(headers, name)
            if value is not None:
                other = same_origin_key(key, value)
                if other is not None:
                    yield from _io(self.store.remove(other))

    def _revalidated(self, exchange: Exchange, state: _State, head: ResponseHead,
                     now: float) -> Flow[ResponseHead | None]:
        entry = state.entry
        assert entry is not None
        if state.mode == "revalidate" and head.status == 304 and \
                policy.same_validator(head.headers, entry.headers):
            # RFC 9111 4.3.4: freshen the stored fields and times, answer from the store.
            yield from self._freshen(entry, state, head, now)
            return (yield from self._from_store(exchange, entry, "fwd=stale; fwd-status=304",
                                                now))
        if head.status >= 500:
            stored = _stored(entry)
            ttl = stored.lifetime - entry.age(now)
            if policy.stale_if_error(stored.rules.cc, state.request_cc, ttl):
                return (yield from self._from_store(exchange, entry,
                                                    f"hit; ttl={math.floor(ttl)}; fwd=stale; "
                                                    f"fwd-status={head.status}", now))
        return None

    def _from_store(self, exchange: Exchange, entry: Entry, status: str,
                    now: float) -> Flow[ResponseHead | None]:
        """The stored response as the answer to a forwarded request (None: its body
        could not be read, the upstream's response goes on)."""
        if not (yield from self._load(exchange, entry)):
            return None
        exchange.record.cache = "stale" if status.startswith("hit") else "revalidated"
        age = entry.age(now)
        asked = exchange.state[Cache].asked
        if exchange.incoming.method == "GET" and entry.status == 200 and \
                asked.conditional() and self._not_modified(asked, entry):
            headers = [(n, v) for n, v in entry.headers if n in policy.NOT_MODIFIED_FIELDS]
            headers += [(b"age", b"%d" % int(age)), policy.cache_status(status)]
            exchange.replace_response_body(b"")
            return ResponseHead(304, headers, has_body=False)
        has_body = exchange.incoming.method != "HEAD" and entry.status not in (204, 304)
        exchange.replace_response_body(entry.chunks() if has_body else b"")
        return ResponseHead(entry.status, self._stored_head(entry, age, status),
                            has_body=has_body)

    def _storable(self, incoming: IncomingRequest, state: _State, head: ResponseHead,
                  now: float) -> tuple[Entry | None, str, int | None]:
        """The entry to store for `head` (None: not storable), the reason it is not,
        and the body's announced length."""
        rules = ResponseRules.of(head.headers)
        reason = policy.storable(incoming.method, head.status, rules, state.request_cc,
                                 state.asked.authorization is not None)
        names = vary_names(head.headers)
        if reason is None and names is None:
            reason = "vary *"
        if reason is None and not self.store_set_cookie and \
                policy.first(head.headers, b"set-cookie") is not None:
            reason = "set-cookie"
        length = policy.first(head.headers, b"content-length")
        size = int(length) if length is not None and length.isdigit() else None
        if reason is None and size is not None and size > self.store.max_object:
            reason = "too large"
        if reason is not None or names is None:
            return None, reason or "vary *", size
        date = policy.parse_date(head.date) if head.date is not None else None
        date = date if date is not None else now
        entry = Entry(state.key, names, vary_values(incoming.headers, names), head.status,
                      policy.fields_to_store(head.headers, rules.cc),
                      state.request_time, now, date,
                      policy.initial_age(head.headers, date, state.request_time, now))
        return entry, "", size

    def _miss(self, exchange: Exchange, state: _State, head: ResponseHead,
              now: float) -> Flow[ResponseHead]:
        incoming = exchange.incoming
        entry, _, size = self._storable(incoming, state, head, now)
        detail = f"fwd={state.forward}; fwd-status={head.status}"
        exchange.record.cache = "miss"
        if entry is not None:
            if head.status == 204 or not head.has_body:
                if incoming.method == "GET":
                    yield from _io(self.store.put(entry))
                    detail += "; stored"
            elif exchange.transform_response(
                    _Recorder(writer := self.store.writer(entry), size, state.flight,
                              exchange, self.store.put), same_length=True):
                state.writer = writer
                detail += "; stored"
                if state.flight is not None:
                    framing = [] if size is None else [(b"content-length", b"%d" % size)]
                    state.flight.publish(Head(head.status, entry.headers + framing,
                                              entry.vary, entry.selected))
        if state.flight is not None and not state.flight.decided:
            state.flight.publish(None)  # nothing to share: the followers go upstream
        if entry is None and state.entry is not None and state.mode == "revalidate" \
                and head.status < 500:
            yield from _io(self.store.discard(state.entry))  # replaced: it may not keep it
        headers = [*head.headers, policy.cache_status(detail)]
        return ResponseHead(head.status, headers, head.has_body, head.date)

    # -- stale-while-revalidate: the refresh behind a stale answer ---------------------------

    def _refresh(self, exchange: Exchange, state: _State, entry: Entry) -> None:
        """Fetch `entry` again (conditionally) without making this request wait."""
        plan = exchange.plan
        if self.refresher is None or plan is None or exchange.incoming.method != "GET":
            return
        kept = [(n, v) for n, v in plan.headers if n.lower() not in _CONDITIONALS]
        plan = _replace_headers(plan, kept + policy.validators(entry.headers))
        incoming = exchange.incoming

        def refreshed(head: ResponseHead, body: bytes) -> Flow[None]:
            now = time.time()
            if head.status == 304 and policy.same_validator(head.headers, entry.headers):
                yield from self._freshen(entry, state, head, now)
                return
            new, _, _ = self._storable(incoming, state, head, now)
            if new is not None and head.status != 304:
                new.body = body
                yield from _io(self.store.put(new))

        self.refresher.start(state.key, plan, lambda head, body: run_either(refreshed(head, body)))

    def _freshen(self, entry: Entry, state: _State, head: ResponseHead,
                 now: float) -> Flow[None]:
        """RFC 9111 4.3.4: a 304's fields and times onto the stored response."""
        entry.headers = policy.freshen(entry.headers, head.headers)
        date = policy.parse_date(head.date) if head.date is not None else None
        entry.date = date if date is not None else now
        entry.request_time, entry.response_time = state.request_time, now
        entry.initial_age = policy.initial_age(head.headers, entry.date, state.request_time, now)
        yield from _io(self.store.update(entry))

    def close(self) -> None:
        close_store(self.store)

    async def aclose(self) -> None:
        await aclose_store(self.store)

    def for_sync_face(self) -> Filter:
        """With an asyncio store (Redis), the same cache over its sync twin."""
        store = self.store.for_sync_face()
        if store is self.store:
            return self
        return Cache(store, store_set_cookie=self.store_set_cookie, may_purge=self.may_purge,
                     refresher=self.refresher)


_LOOKUPS = frozenset({"GET", "HEAD"})
_KEYS_KEPT = 4096
# What a sync store's calls return (no awaitable: no need to ask inspect).
_PLAIN = frozenset({list, bytes, bytearray, int, bool, type(None)})


def _io(result: T | Awaitable[T]) -> Flow[T]:
    """A store call's result: awaited (by the async face) when the store is asyncio's."""
    if type(result) not in _PLAIN and inspect.isawaitable(result):
        return (yield result)  # type: ignore[no-any-return]
    return result  # type: ignore[return-value]


def _replace_headers(plan: UpstreamPlan, headers: list[Header]) -> UpstreamPlan:
    return dataclasses.replace(plan, headers=headers)
