"""A wait with a timeout that never loses a cancel.

asyncio.wait_for, up to Python 3.11, returns the result when the awaited thing
completes in the same loop turn as a cancel of the waiting task, and drops the
cancel (CPython gh-86296). The drain's cut is such a cancel, sent once: lost, the
exchange ran on until the server killed its task. wait_for also wraps a coroutine
in a task of its own, a cost on every body piece. `within` has neither problem.

It is asyncio.timeout's rule (3.11+) without its context manager, which costs
twice a plain timer on the hot path (every wait for an upstream's bytes): a timer
cancels the waiting task, and only that cancel, when no other was requested
meanwhile (`Task.cancelling`), becomes the TimeoutError. Python 3.10 has no
cancel count: there a cancel that comes with the timer's is taken as the timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(awaitable: Awaitable[T], seconds: float | None,
                 loop: asyncio.AbstractEventLoop | None = None) -> T:
    """`await awaitable`, or asyncio.TimeoutError after `seconds` (None: no limit).
    `loop`, the running loop when the caller has it at hand, spares a look-up
    (before Python 3.12 each asks the kernel for the pid)."""
    if seconds is None:
        return await awaitable
    task = asyncio.current_task(loop)
    assert task is not None
    cancelling = getattr(task, "cancelling", None)  # Python 3.11+
    before = 0 if cancelling is None else cancelling()
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


def _uncancel(task: asyncio.Task[object]) -> int:
    """Withdraw the timer's cancel request; the requests left (0 before 3.11)."""
    uncancel = getattr(task, "uncancel", None)
    return 0 if uncancel is None else int(uncancel())
