"""A wait with a timeout that never loses a cancel.

asyncio.wait_for, up to Python 3.11, returns the result when the awaited thing
completes in the same loop turn as a cancel of the waiting task, and drops the
cancel (CPython gh-86296). The drain's cut is such a cancel, sent once: lost, the
exchange ran on until the server killed its task. wait_for also wraps a coroutine
in a task of its own, a cost on every body piece. `within` has neither problem.

Any awaitable: asyncio.timeout's rule (3.11+) without its context manager (which
costs more than the wait it guards on the hot path): a timer cancels the waiting
task, and only that cancel, when no other was requested meanwhile
(`Task.cancelling`), becomes the TimeoutError. Python 3.10 has no cancel count:
there a cancel that comes with the timer's is taken as the timeout.

The caller's own future (`owned`, the HTTP/1.1 client's waits for bytes and for a
pool slot): the timer sets the TimeoutError on the future instead, so the task is
never cancelled by it: a real cancel stays one, a result given in the step the
timer fires in is kept, and it costs a timer alone.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

T = TypeVar("T")


async def within(awaitable: Awaitable[T], seconds: float | None,
                 loop: asyncio.AbstractEventLoop | None = None, *,
                 owned: bool = False) -> T:
    """`await awaitable`, or asyncio.TimeoutError after `seconds` (None: no limit).

    `loop`: the running loop when the caller has it at hand (a look-up spared:
    before Python 3.12 each asks the kernel for the pid). `owned`: `awaitable` is
    an asyncio future only the caller completes (see the module's text).
    """
    if seconds is None:
        return await awaitable
    if owned:
        future = cast("asyncio.Future[T]", awaitable)
        timer = future.get_loop().call_later(seconds, _expire, future)
        try:
            return await future
        finally:
            timer.cancel()
    task = asyncio.current_task(loop)
    assert task is not None
    before = _cancelling(task)
    fired = False

    def expire() -> None:
        nonlocal fired
        fired = True
        task.cancel()

    timer = task.get_loop().call_later(seconds, expire)
    try:
        result = await awaitable
    except asyncio.CancelledError:
        timer.cancel()
        if fired and _uncancel(task) <= before:
            raise asyncio.TimeoutError() from None
        raise
    except BaseException:
        timer.cancel()
        if fired:
            _uncancel(task)
        raise
    timer.cancel()
    if fired:  # the awaitable swallowed the timer's cancel
        _uncancel(task)
    return result


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(asyncio.TimeoutError())


if sys.version_info >= (3, 11):
    def _cancelling(task: asyncio.Task[Any]) -> int:
        return task.cancelling()

    def _uncancel(task: asyncio.Task[Any]) -> int:
        """Withdraw the timer's cancel request; the requests left."""
        return task.uncancel()
else:
    def _cancelling(task: asyncio.Task[Any]) -> int:
        return 0

    def _uncancel(task: asyncio.Task[Any]) -> int:
        return 0


class LazyTimer:
    """A deadline that is set and cleared far more often than it passes (a connection's
    idle or head clock, an upstream read) on one loop timer: armed at the earliest
    deadline, left armed when the deadline is cleared or moved later; when it fires
    for a deadline still ahead it arms itself for what is left, and for a passed one
    it calls `expired`. So a request costs no timer of its own (a timer armed and
    cancelled a request cost more than any other step of uvicorn's).

    Clear the deadline with `timer.deadline = None` (a plain store on the hot path);
    `stop` when the owner is done (the loop lets go of it at once)."""

    __slots__ = ("loop", "expired", "deadline", "_handle", "_at")

    def __init__(self, loop: asyncio.AbstractEventLoop, expired: Callable[[], None]) -> None:
        self.loop, self.expired = loop, expired
        self.deadline: float | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._at = 0.0

    def set(self, deadline: float) -> None:
        """`expired` at `deadline` (the loop's clock), unless cleared or set again first."""
        self.deadline = deadline
        if self._handle is None or deadline < self._at:
            self._arm(deadline)

    def stop(self) -> None:
        self.deadline = None
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.cancel()

    def _arm(self, at: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._at = at
        self._handle = self.loop.call_at(at, self._fire)

    def _fire(self) -> None:
        self._handle = None
        deadline = self.deadline
        if deadline is None:
            return  # cleared: the next `set` arms it again
        if self.loop.time() < deadline:
            self._arm(deadline)
            return
        self.deadline = None
        self.expired()
