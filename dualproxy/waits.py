"""A wait with a timeout that never loses a cancel.

asyncio.wait_for, up to Python 3.11, returns the result when the awaited thing
completes in the same loop turn as a cancel of the waiting task, and drops the
cancel (CPython gh-86296). The drain's cut is such a cancel, sent once: lost, the
exchange ran on until the server killed its task. wait_for also wraps a coroutine
in a task of its own, a cost on every body piece. `within` has neither problem.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")

if sys.version_info >= (3, 11):
    async def within(awaitable: Awaitable[T], seconds: float | None) -> T:
        """`await awaitable`, or asyncio.TimeoutError after `seconds` (None: no limit)."""
        async with asyncio.timeout(seconds):
            return await awaitable
else:
    async def within(awaitable: Awaitable[T], seconds: float | None) -> T:
        """`await awaitable`, or asyncio.TimeoutError after `seconds` (3.10 has no
        asyncio.timeout: a timer cancels the task, and only its own cancel becomes
        the timeout)."""
        if seconds is None:
            return await awaitable
        task = asyncio.current_task()
        assert task is not None
        fired = False

        def expire() -> None:
            nonlocal fired
            fired = True
            task.cancel()

        timer = asyncio.get_running_loop().call_later(seconds, expire)
        try:
            return await awaitable
        except asyncio.CancelledError:
            if fired:
                raise asyncio.TimeoutError() from None
            raise
        finally:
            timer.cancel()
