"""Where stored responses live: entries, and the memory store (per worker process).

A store maps a primary key (keys.py) to the stored variants of that URI. It is
bounded by bytes (headers and body counted), evicting the least recently used
URI first; a response larger than the object limit is never stored. Bodies are
written as they stream past (`Writer.write`) and only become visible at
`Writer.commit`, which the filter calls when the body completed: an aborted
response is never stored.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol

from ...headers import Header
from .keys import VaryNames, VaryValues

error_logger = logging.getLogger("dualproxy")

DEFAULT_MAX_SIZE = 256 * 1024 * 1024
DEFAULT_MAX_OBJECT = 64 * 1024 * 1024
# Served in slices of this size (one send per slice, as the upstream relay does).
SLICE = 1024 * 1024
# A stored body: a stored miss's is the bytearray it streamed into (never copied whole).
Body = bytes | bytearray


@dataclass(eq=False)
class Entry:
    """One stored response: its variant's secondary key, status, stored fields,
    body and the times RFC 9111 4.2.3 ages it by."""

    key: str
    vary: VaryNames
    selected: VaryValues
    status: int
    headers: list[Header]
    request_time: float
    response_time: float
    date: float             # the Date the origin gave (else when it arrived)
    initial_age: float      # corrected_initial_age at response_time
    body: Body = b""
    size: int = field(default=0)
    # A store that reads bodies only when they answer (sqlite) sets both: the
    # body's length, and how to read it.
    length: int = -1
    loader: Callable[[], bytes] | None = None
    ref: object = None      # the store's own handle on it (sqlite: its row)
    # A store that streams bodies (redis) sets it at `load`: bytes [start, end) of the
    # body, read from the store as they are taken (an async iterable on the async face).
    stream: Callable[[int, int], Iterable[bytes] | AsyncIterable[bytes]] | None = \
        field(default=None, repr=False)
    # What a hit needs of it, computed once for each version of its fields (filter.py's
    # _Stored: the caching rules, the lifetime, the validators, the head to send).
    view: Any = field(default=None, repr=False)

    def age(self, now: float) -> float:
        elapsed = now - self.response_time  # (no max(): a call less, each hit)
        return self.initial_age + (elapsed if elapsed > 0.0 else 0.0)

    def body_length(self) -> int:
        return self.length if self.length >= 0 else len(self.body)

    def content(self) -> Body:
        """The body, read from the store now if it was not yet."""
        if self.loader is not None:
            self.body, self.loader = self.loader(), None
        return self.body

    def measure(self) -> int:
        self.size = self.body_length() + sum(len(n) + len(v) for n, v in self.headers) + 256
        return self.size

    def chunks(self) -> Iterable[bytes] | AsyncIterable[bytes]:
        """The body, in slices: streamed from the store when it streams."""
        if self.stream is not None:
            return self.stream(0, self.body_length())
        return self._slices()

    def whole(self) -> bytes | Iterable[bytes] | AsyncIterable[bytes]:
        """The body as one bytes object when it is in memory and one slice at most
        (a face sends it in one go), else `chunks`."""
        body = self.body
        if type(body) is bytes and self.stream is None and self.loader is None \
                and len(body) <= SLICE:
            return body
        return self.chunks()

    def part(self, start: int, end: int) -> bytes | Iterable[bytes] | AsyncIterable[bytes]:
        """Bytes [start, end] of the body (`chunks`' way)."""
        if self.stream is not None:
            return self.stream(start, end + 1)
        return bytes(self.content()[start:end + 1])

    def _slices(self) -> Iterator[bytes]:
        body = self.content()
        if len(body) <= SLICE:
            if body:
                yield bytes(body)
            return
        view = memoryview(body)
        for start in range(0, len(body), SLICE):
            yield bytes(view[start:start + SLICE])


class Writer:
    """A response body being stored as it streams: abandoned past `limit` bytes."""

    __slots__ = ("entry", "limit", "buffer", "size", "ok")

    def __init__(self, entry: Entry, limit: int) -> None:
        self.entry, self.limit = entry, limit
        # One buffer grown in place (a large one by mremap, no copy): a body joined
        # from its chunks at the end would need twice its size for a moment.
        self.buffer = bytearray()
        self.size = 0
        self.ok = True

    def write(self, chunk: bytes) -> None:
        if not self.ok:
            return
        self.size += len(chunk)
        if self.size > self.limit:
            self.ok = False
            self.buffer = bytearray()
            return
        self.buffer += chunk

    def flush(self) -> Awaitable[None] | None:
        """Called after each `write`, outside the followers' lock: a store that writes
        the body as it comes (redis) writes what it has; an awaitable on the async
        face (awaited before the chunk goes on)."""
        return None

    def abort(self) -> Awaitable[None] | None:
        """The exchange is over (whatever its outcome): a store that writes the body as
        it comes (redis) deletes what it wrote unless it was committed; an awaitable on
        the async face."""
        return None

    def commit(self) -> Entry | None:
        """The body is complete: the entry to store (None: it was too large)."""
        if not self.ok:
            return None
        # The buffer is never written again (followers may read it still); a body of
        # one slice is kept as bytes, answered as it is (Entry.whole).
        buffer = self.buffer
        self.entry.body = bytes(buffer) if len(buffer) <= SLICE else buffer
        self.ok = False
        return self.entry


class Store(Protocol):
    """What the filter asks of a store (memory here, sqlite.py, redis.py). A store
    on the async face may answer each call with an awaitable (redis.py's asyncio
    driver): the filter awaits it there (`Cache` runs its stages as flows)."""

    name: str
    max_object: int
    # True: no call ever returns an awaitable (the filter then answers a fresh hit
    # without a flow); a store without it is taken as asynchronous.
    synchronous: bool

    def get(self, key: str) -> list[Entry] | Awaitable[list[Entry]]: ...

    def load(self, entry: Entry) -> Body | None | Awaitable[Body | None]: ...

    def writer(self, entry: Entry) -> Writer: ...

    def put(self, entry: Entry) -> None | Awaitable[None]: ...

    def update(self, entry: Entry) -> None | Awaitable[None]: ...

    def remove(self, key: str) -> int | Awaitable[int]: ...

    def discard(self, entry: Entry) -> None | Awaitable[None]: ...

    def for_sync_face(self) -> Store: ...


def close_store(store: object) -> None:
    """Close what a store holds (its client), when it holds something (`close`)."""
    close = getattr(store, "close", None)
    if close is not None:
        close()


async def aclose_store(store: object) -> None:
    """The same from the event loop (`aclose`: an asyncio client)."""
    aclose = getattr(store, "aclose", None)
    if aclose is not None:
        await aclose()


class Bounded:
    """What every store shares: its object limit and the writer over it."""

    name = "store"
    max_object = DEFAULT_MAX_OBJECT
    synchronous = True

    def writer(self, entry: Entry) -> Writer:
        return Writer(entry, self.max_object)

    def fits(self, entry: Entry) -> int | None:
        """`entry`'s size (measured now), or None when it is over the object limit."""
        size = entry.measure()
        return size if size <= self.max_object else None

    def load(self, entry: Entry) -> Body | None | Awaitable[Body | None]:
        """`entry`'s body, read from the store now if it was not yet."""
        return entry.content()

    def for_sync_face(self) -> Store:
        """The store the sync face uses in this one's place: itself, or the sync twin
        of an asyncio store."""
        return self  # type: ignore[return-value]


# The store failed during the current exchange (its thread's or task's context): the
# filter counts it (`dualproxy_cache_store_errors_total`).
STORE_FAILED: ContextVar[bool] = ContextVar("dualproxy_cache_store_failed", default=False)
_STEP_ASIDE = 1.0  # seconds a failed store is left alone before it is asked again


class Guarded(Bounded):
    """A store that steps aside when it fails: a WARNING (at most one every 10 s), the
    request goes on uncached, never a 5xx, and the store is not asked again for a
    second (a Redis that does not answer costs one timeout, not one per request).
    The same guard for a sync store and an asyncio one (its awaitables are guarded)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.name = store.name
        self.max_object = store.max_object
        self.synchronous = getattr(store, "synchronous", False) is True
        self._warned = 0.0
        self._retry_at = 0.0

    def _failed(self, what: str, exc: Exception | None) -> None:
        STORE_FAILED.set(True)
        if exc is None:
            return
        now = time.monotonic()
        self._retry_at = now + _STEP_ASIDE
        if now - self._warned >= 10.0:
            self._warned = now
            error_logger.warning("cache: the %s store failed to %s (%r): requests go "
                                 "upstream uncached", self.name, what, exc)

    def _guard(self, what: str, call: Callable[[], Any], default: Any) -> Any:
        if time.monotonic() < self._retry_at:
            self._failed(what, None)  # stepped aside: not asked
            return default
        try:
            result = call()
        except Exception as exc:
            self._failed(what, exc)
            return default
        if inspect.isawaitable(result):
            return self._aguard(what, result, default)
        return result

    async def _aguard(self, what: str, result: Awaitable[Any], default: Any) -> Any:
        try:
            return await result
        except Exception as exc:
            self._failed(what, exc)
            return default

    def get(self, key: str) -> list[Entry] | Awaitable[list[Entry]]:
        return self._guard("look up", lambda: self.store.get(key), [])  # type: ignore[no-any-return]

    def load(self, entry: Entry) -> Body | None | Awaitable[Body | None]:
        return self._guard("read", lambda: self.store.load(entry), None)  # type: ignore[no-any-return]

    def put(self, entry: Entry) -> None | Awaitable[None]:
        return self._guard("store", lambda: self.store.put(entry), None)  # type: ignore[no-any-return]

    def update(self, entry: Entry) -> None | Awaitable[None]:
        return self._guard("update", lambda: self.store.update(entry), None)  # type: ignore[no-any-return]

    def remove(self, key: str) -> int | Awaitable[int]:
        return self._guard("remove", lambda: self.store.remove(key), 0)  # type: ignore[no-any-return]

    def discard(self, entry: Entry) -> None | Awaitable[None]:
        return self._guard("remove", lambda: self.store.discard(entry), None)  # type: ignore[no-any-return]

    def close(self) -> None:
        close_store(self.store)

    async def aclose(self) -> None:
        await aclose_store(self.store)

    def writer(self, entry: Entry) -> Writer:
        if time.monotonic() < self._retry_at:  # stepped aside: kept here, never stored
            return Bounded.writer(self, entry)
        return self.store.writer(entry)

    def for_sync_face(self) -> Store:
        twin = self.store.for_sync_face()
        return self if twin is self.store else Guarded(twin)


class MemoryStore(Bounded):
    """Entries in this process's memory, LRU by URI, bounded by `max_size` bytes."""

    name = "memory"

    def load(self, entry: Entry) -> Body:
        """`entry`'s body: in memory (a call less than Bounded's, each hit)."""
        return entry.body

    def __init__(self, max_size: int = DEFAULT_MAX_SIZE,
                 max_object: int = DEFAULT_MAX_OBJECT) -> None:
        self.max_size = max_size
        self.max_object = min(max_object, max_size)
        self.size = 0
        self._entries: OrderedDict[str, list[Entry]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> list[Entry]:
        with self._lock:
            variants = self._entries.get(key)
            if variants is None:
                return []
            self._entries.move_to_end(key)
            return list(variants)

    def put(self, entry: Entry) -> None:
        """Store `entry`, replacing the variant it selects the same way."""
        size = self.fits(entry)
        if size is None:
            return
        with self._lock:
            variants = self._entries.pop(entry.key, [])
            kept = []
            for old in variants:
                if old.vary == entry.vary and old.selected == entry.selected:
                    self.size -= old.size
                else:
                    kept.append(old)
            kept.append(entry)
            self._entries[entry.key] = kept
            self.size += size
            self._evict()

    def update(self, entry: Entry) -> None:
        """`entry`'s fields changed (a 304 freshened it): account its new size."""
        with self._lock:
            variants = self._entries.get(entry.key)
            if variants is None or entry not in variants:
                return
            self.size -= entry.size
            self.size += entry.measure()
            self._evict()

    def remove(self, key: str) -> int:
        """Drop every variant of `key`; how many there were."""
        with self._lock:
            variants = self._entries.pop(key, [])
            self.size -= sum(v.size for v in variants)
            return len(variants)

    def discard(self, entry: Entry) -> None:
        with self._lock:
            variants = self._entries.get(entry.key)
            if variants is None or entry not in variants:
                return
            variants.remove(entry)
            self.size -= entry.size
            if not variants:
                del self._entries[entry.key]

    def _evict(self) -> None:
        while self.size > self.max_size and self._entries:
            _, variants = self._entries.popitem(last=False)
            self.size -= sum(v.size for v in variants)
