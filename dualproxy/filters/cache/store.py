"""Where stored responses live: entries, and the memory store (per worker process).

A store maps a primary key (keys.py) to the stored variants of that URI. It is
bounded by bytes (headers and body counted), evicting the least recently used
URI first; a response larger than the object limit is never stored. Bodies are
written as they stream past (`Writer.write`) and only become visible at
`Writer.commit`, which the filter calls when the body completed: an aborted
response is never stored.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from ...headers import Header
from .keys import VaryNames, VaryValues

error_logger = logging.getLogger("dualproxy")

DEFAULT_MAX_SIZE = 256 * 1024 * 1024
DEFAULT_MAX_OBJECT = 64 * 1024 * 1024
# Served in slices of this size (one send per slice, as the upstream relay does).
SLICE = 1024 * 1024


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
    body: bytes = b""
    size: int = field(default=0)
    # A store that reads bodies only when they answer (sqlite) sets both: the
    # body's length, and how to read it.
    length: int = -1
    loader: Callable[[], bytes] | None = None
    ref: object = None      # the store's own handle on it (sqlite: its row)

    def age(self, now: float) -> float:
        return self.initial_age + max(0.0, now - self.response_time)

    def body_length(self) -> int:
        return len(self.body) if self.loader is None else self.length

    def content(self) -> bytes:
        """The body, read from the store now if it was not yet."""
        if self.loader is not None:
            self.body, self.loader = self.loader(), None
        return self.body

    def measure(self) -> int:
        self.size = self.body_length() + sum(len(n) + len(v) for n, v in self.headers) + 256
        return self.size

    def chunks(self) -> Iterator[bytes]:
        body = self.content()
        if len(body) <= SLICE:
            if body:
                yield body
            return
        view = memoryview(body)
        for start in range(0, len(body), SLICE):
            yield bytes(view[start:start + SLICE])


class Writer:
    """A response body being stored as it streams: abandoned past `limit` bytes."""

    __slots__ = ("put", "entry", "limit", "parts", "size", "ok")

    def __init__(self, put: Callable[[Entry], None], entry: Entry, limit: int) -> None:
        self.put, self.entry, self.limit = put, entry, limit
        self.parts: list[bytes] = []
        self.size = 0
        self.ok = True

    def write(self, chunk: bytes) -> None:
        if not self.ok:
            return
        self.size += len(chunk)
        if self.size > self.limit:
            self.ok = False
            self.parts = []
            return
        self.parts.append(bytes(chunk))

    def commit(self) -> bool:
        """The body is complete: store the entry (False: it was too large)."""
        if not self.ok:
            return False
        self.entry.body = b"".join(self.parts)
        self.parts = []
        self.put(self.entry)
        return True


class Store(Protocol):
    """What the filter asks of a store (memory here, sqlite.py)."""

    name: str
    max_object: int

    def get(self, key: str) -> list[Entry]: ...

    def writer(self, entry: Entry) -> Writer: ...

    def put(self, entry: Entry) -> None: ...

    def update(self, entry: Entry) -> None: ...

    def remove(self, key: str) -> int: ...

    def discard(self, entry: Entry) -> None: ...


class Bounded:
    """What every store shares: its object limit and the writer over it."""

    name = "store"
    max_object = DEFAULT_MAX_OBJECT

    def writer(self, entry: Entry) -> Writer:
        return Writer(self.put, entry, self.max_object)

    def put(self, entry: Entry) -> None:
        raise NotImplementedError

    def fits(self, entry: Entry) -> int | None:
        """`entry`'s size (measured now), or None when it is over the object limit."""
        size = entry.measure()
        return size if size <= self.max_object else None


class Guarded(Bounded):
    """A store that steps aside when it fails: each failure is a WARNING (at most one
    every 10 s) and the request goes on uncached, never a 5xx."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.name = store.name
        self.max_object = store.max_object
        self._warned = 0.0

    def _failed(self, what: str, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._warned >= 10.0:
            self._warned = now
            error_logger.warning("cache: the %s store failed to %s (%r): requests go "
                                 "upstream uncached", self.name, what, exc)

    def get(self, key: str) -> list[Entry]:
        try:
            return self.store.get(key)
        except Exception as exc:
            self._failed("look up", exc)
            return []

    def put(self, entry: Entry) -> None:
        try:
            self.store.put(entry)
        except Exception as exc:
            self._failed("store", exc)

    def update(self, entry: Entry) -> None:
        try:
            self.store.update(entry)
        except Exception as exc:
            self._failed("update", exc)

    def remove(self, key: str) -> int:
        try:
            return self.store.remove(key)
        except Exception as exc:
            self._failed("remove", exc)
            return 0

    def discard(self, entry: Entry) -> None:
        try:
            self.store.discard(entry)
        except Exception as exc:
            self._failed("remove", exc)


class MemoryStore(Bounded):
    """Entries in this process's memory, LRU by URI, bounded by `max_size` bytes."""

    name = "memory"

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
