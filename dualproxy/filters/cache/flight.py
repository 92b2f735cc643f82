"""Request collapsing: one upstream fetch per key, the other requests served from it.

The first miss for a key is the leader: its fetch becomes a `Flight` that others
(followers) join instead of going upstream. A follower waits for the leader's head
(at most `LOCK_TIMEOUT` seconds, as nginx's `proxy_cache_lock_timeout`), then, when
that head may be stored and its Vary selects the follower's request too, is answered
with it and with the body as it arrives: what the leader relayed so far, then
what comes. The body is read from the leader's store writer (store.Writer, one
buffer: never a second copy), so a flight holds no more than the object limit:
past it (a body without Content-Length that grows too large) the followers'
answers are aborted and the leader goes on alone. Otherwise (not storable,
another variant, the wait ran out) the follower goes upstream itself. A leader
whose body breaks breaks its followers' answers too (aborted, never ended as if
complete).

Waiting is a threading.Condition on the sync face (a follower holds its worker
thread, as the leader does) and an asyncio.Event per waiter on the async face (all
on the loop's thread).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator

from ...errors import UpstreamBroken
from ...headers import Header
from ...waits import within
from .keys import VaryNames, VaryValues
from .store import SLICE, Writer

LOCK_TIMEOUT = 5.0      # the longest wait for the leader's head
IDLE_TIMEOUT = 60.0     # the longest wait for the leader's next chunk


class Head:
    """The leader's response as followers get it."""

    __slots__ = ("status", "headers", "vary", "selected")

    def __init__(self, status: int, headers: list[Header], vary: VaryNames,
                 selected: VaryValues) -> None:
        self.status, self.headers, self.vary, self.selected = status, headers, vary, selected


class Flight:
    """One upstream fetch in progress that other requests may join."""

    def __init__(self) -> None:
        self.head: Head | None = None
        self.decided = False       # the head is in (usable or not)
        self.writer: Writer | None = None  # where the leader's body goes: read from it
        self.size = 0              # the bytes of it followers may read
        self.done = False
        self.failed = False
        self.joined = 0
        self._cond = threading.Condition()
        self._events: list[asyncio.Event] = []

    # -- the leader -----------------------------------------------------------------------

    def publish(self, head: Head | None) -> None:
        """The leader's head (None: followers go upstream themselves)."""
        with self._cond:
            self.head, self.decided = head, True
        self._wake()

    def write(self, writer: Writer, chunk: bytes) -> None:
        """The leader's next chunk, into its store writer (under the followers' lock:
        they read its buffer)."""
        with self._cond:
            self.writer = writer
            writer.write(chunk)
            if writer.ok:
                self.size = writer.size
            elif not self.done:
                self.failed = self.decided = True  # past the object limit: followers stop
        self._wake()

    def _read(self, index: int) -> bytes:
        """Up to a slice of the body from `index` (under the lock)."""
        if self.writer is None or self.failed:
            return b""
        end = min(self.size, index + SLICE)
        with memoryview(self.writer.buffer) as view:
            return bytes(view[index:end])

    def end(self, complete: bool) -> None:
        with self._cond:
            if self.done or self.failed:
                return
            if complete:
                self.done = True
            else:
                self.failed = True
            self.decided = True
        self._wake()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()
            events, self._events = self._events, []
        for event in events:
            event.set()

    # -- a follower -----------------------------------------------------------------------

    def wait_head(self, timeout: float = LOCK_TIMEOUT) -> Head | None:
        with self._cond:
            self._cond.wait_for(lambda: self.decided, timeout)
            if self.head is not None and not self.failed:
                self.joined += 1
                return self.head
            return None

    async def await_head(self, timeout: float = LOCK_TIMEOUT) -> Head | None:
        deadline = time.monotonic() + timeout
        while not self.decided:
            left = deadline - time.monotonic()
            if left <= 0 or not await self._changed(left):
                return None
        if self.head is not None and not self.failed:
            self.joined += 1
            return self.head
        return None

    async def _changed(self, timeout: float) -> bool:
        event = asyncio.Event()
        with self._cond:
            self._events.append(event)
        try:
            await within(event.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def body(self) -> Iterator[bytes]:
        index = 0
        while True:
            with self._cond:
                deadline = time.monotonic() + IDLE_TIMEOUT
                while index >= self.size and not (self.done or self.failed):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                piece = self._read(index)
                done, failed = self.done, self.failed
            if not piece:
                if done and not failed:
                    return
                raise UpstreamBroken("the fetch this request was collapsed into broke"
                                     if failed else "the collapsed fetch stalled")
            index += len(piece)
            yield piece

    async def abody(self) -> AsyncIterator[bytes]:
        index = 0
        while True:
            with self._cond:
                piece = self._read(index)
            if piece:
                index += len(piece)
                yield piece
                continue
            if self.done:
                return
            if self.failed or not await self._changed(IDLE_TIMEOUT):
                raise UpstreamBroken("the fetch this request was collapsed into broke"
                                     if self.failed else "the collapsed fetch stalled")
