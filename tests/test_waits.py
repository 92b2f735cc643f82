"""waits.within: asyncio.timeout's rule without a cancel ever lost (gh-86296), on every
Python the package supports (nox's versions sessions run this file on 3.10 too).

Each race is made deterministic on a loop whose clock the test moves: the timer is
due at the next step, where a callback queued first does its part.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from dualproxy.waits import within


def run(make: Callable[[asyncio.AbstractEventLoop, list[float]], Awaitable[Any]]) -> Any:
    loop = asyncio.new_event_loop()
    now = [loop.time()]
    loop.time = lambda: now[0]  # type: ignore[method-assign]
    try:
        return loop.run_until_complete(make(loop, now))
    finally:
        loop.close()


def cancelling(task: asyncio.Task[Any]) -> int:
    count = getattr(task, "cancelling", None)  # Python 3.11+
    return 0 if count is None else int(count())


def test_the_result_comes_back() -> None:
    async def main(loop: asyncio.AbstractEventLoop, now: list[float]) -> Any:
        future = loop.create_future()
        loop.call_soon(future.set_result, "done")
        return await within(future, 5.0), await within(asyncio.sleep(0, "free"), None)

    assert run(main) == ("done", "free")


def time_out(owned: bool) -> asyncio.Future[Any]:
    """A wait that times out: its task is left with no cancel (the timer's own was
    withdrawn, or never made); the future it awaited is returned."""
    async def main(loop: asyncio.AbstractEventLoop, now: list[float]) -> Any:
        future = loop.create_future()

        async def waiting() -> str:
            try:
                await within(future, 1.0, loop, owned=owned)
            except asyncio.TimeoutError:
                task = asyncio.current_task()
                assert task is not None and cancelling(task) == 0
                await asyncio.sleep(0)  # and nothing cancels the task later
                return "timed out"
            return "served"

        task = asyncio.ensure_future(waiting())
        await asyncio.sleep(0)
        now[0] += 2.0
        assert await task == "timed out"
        return future

    return run(main)  # type: ignore[no-any-return]


def test_the_timeout_is_a_timeout_error_and_leaves_no_cancel() -> None:
    assert time_out(False).cancelled()  # the wait was ended by cancelling what it awaited


def test_a_cancel_in_the_step_the_result_comes_is_raised() -> None:
    """asyncio.wait_for up to 3.11 returned the result and dropped the cancel."""
    async def main(loop: asyncio.AbstractEventLoop, now: list[float]) -> Any:
        future = loop.create_future()
        task = asyncio.ensure_future(within(future, 5.0))
        await asyncio.sleep(0)
        future.set_result("done")
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return "cancelled"
        return "lost"

    assert run(main) == "cancelled"


async def outcome(task: asyncio.Task[Any]) -> str:
    try:
        await task
    except asyncio.CancelledError:
        return "cancelled"
    except asyncio.TimeoutError:
        return "timed out"
    return "served"


def cancel_as_the_timer_fires(owned: bool) -> str:
    async def main(loop: asyncio.AbstractEventLoop, now: list[float]) -> Any:
        future = loop.create_future()
        task = asyncio.ensure_future(within(future, 1.0, owned=owned))
        await asyncio.sleep(0)
        now[0] += 2.0  # the timer is due at the next step ...
        loop.call_soon(task.cancel)  # ... where this cancel comes first
        return await outcome(task)

    return str(run(main))


def test_a_cancel_in_the_step_the_timer_fires_stays_a_cancel() -> None:
    """Another's cancel (the drain's cut, the client gone) that comes as the timer fires
    is raised as a cancel (Python 3.11+: the task's cancel count tells them apart; 3.10
    has none, and takes it for the timeout)."""
    assert cancel_as_the_timer_fires(False) == (
        "cancelled" if sys.version_info >= (3, 11) else "timed out")


def test_a_result_in_the_step_the_timer_fires_leaves_no_cancel() -> None:
    async def main(loop: asyncio.AbstractEventLoop, now: list[float]) -> Any:
        future = loop.create_future()

        async def waiting() -> str:
            try:
                outcome = await within(future, 1.0)
            except asyncio.TimeoutError:
                outcome = "timed out"
            task = asyncio.current_task()
            assert task is not None and cancelling(task) == 0
            await asyncio.sleep(0)
            return str(outcome)

        task = asyncio.ensure_future(waiting())
        await asyncio.sleep(0)
        now[0] += 2.0
        loop.call_soon(future.set_result, "served")
        return await task

    assert run(main) in ("served", "timed out")


def test_an_error_is_raised_as_it_is() -> None:
    async def main(loop: asyncio.AbstractEventLoop, now: list[float]) -> Any:
        future = loop.create_future()
        loop.call_soon(future.set_exception, ConnectionResetError("gone"))
        with pytest.raises(ConnectionResetError):
            await within(future, 5.0)
        return "raised"

    assert run(main) == "raised"


def test_an_owned_future_times_out_without_cancelling_the_task() -> None:
    assert isinstance(time_out(True).exception(), asyncio.TimeoutError)


def test_an_owned_future_given_its_result_as_the_timer_fires_keeps_it() -> None:
    """A pool slot handed over in the step the pool timeout fires in is used."""
    async def main(loop: asyncio.AbstractEventLoop, now: list[float]) -> Any:
        future = loop.create_future()
        task = asyncio.ensure_future(within(future, 1.0, owned=True))
        await asyncio.sleep(0)
        now[0] += 2.0  # the timer is due at the next step ...
        loop.call_soon(future.set_result, "served")  # ... where the result comes first
        return await task

    assert run(main) == "served"


def test_a_cancel_of_an_owned_wait_stays_a_cancel() -> None:
    assert cancel_as_the_timer_fires(True) == "cancelled"  # on 3.10 too


def test_a_lazy_timer_fires_at_its_latest_deadline_on_one_timer() -> None:
    """LazyTimer: set and cleared often, one loop timer; it calls back only once a
    deadline still set has passed, and a deadline moved earlier arms it earlier."""
    from dualproxy.waits import LazyTimer

    async def main(loop: asyncio.AbstractEventLoop, now: list[float]) -> list[float]:
        fired: list[float] = []
        armed: list[float] = []
        call_at = loop.call_at

        def counting_call_at(when: float, *args: Any) -> asyncio.TimerHandle:
            armed.append(when)
            return call_at(when, *args)

        loop.call_at = counting_call_at  # type: ignore[method-assign]
        timer = LazyTimer(loop, lambda: fired.append(now[0]))

        async def at(moment: float) -> None:  # the clock to `moment`, due timers run
            now[0] = moment
            for _ in range(3):
                await asyncio.sleep(0)

        start = now[0]
        timer.set(start + 5)
        for step in range(1, 4):  # a request a second: cleared, set later
            await at(start + step)
            timer.deadline = None
            timer.set(start + step + 5)
        assert armed == [start + 5]  # no timer a request
        await at(start + 5)  # the first timer fires early: armed for what is left
        assert fired == [] and armed == [start + 5, start + 8]
        timer.set(start + 6)  # earlier than the armed timer: armed earlier
        assert armed[-1] == start + 6
        await at(start + 6)
        assert fired == [start + 6]
        timer.set(start + 7)
        timer.deadline = None  # cleared: nothing fires
        await at(start + 9)
        timer.set(start + 10)
        timer.stop()
        await at(start + 11)
        assert fired == [start + 6]
        return fired

    run(main)
