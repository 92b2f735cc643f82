"""The process's drain clock: what is still in flight when `--graceful-timeout` runs out.

`dualproxy serve` arms it in each worker process with the graceful timeout; the
server hooks in servers/ call `begin()` when the server starts to stop (a
signal, a gunicorn reload). In-flight exchanges register themselves (`enter`,
`leave`: one dict operation each, and nothing at all when unarmed, as for the
faces used as a library). At the deadline a timer thread calls `cut()` on each
one still registered: streams are aborted and logged `shutdown-cut`,
WebSockets closed 1001; a forced stop (`end_now`) does the same at once. The
servers are given `SLACK` more than the deadline, so it is the proxy, not the
server's kill, that ends what is left.

A tunnel blocked in poll() cannot be called: it polls `wake_fd()`, a pipe that
becomes readable at the deadline and stays so.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Protocol

# What the servers get beyond the deadline: time to send close frames and log.
SLACK = 1.0

log = logging.getLogger("dualproxy")


class Cuttable(Protocol):
    def cut(self) -> None: ...


class Drain:
    """One per process (`DRAIN`): armed with a timeout, begun once, expired once."""

    def __init__(self) -> None:
        self.timeout: float | None = None
        self.deadline: float | None = None  # time.monotonic() at which cut() runs
        self.expired = False
        self._inflight: dict[int, Cuttable] = {}
        self._pipe: tuple[int, int] | None = None
        self._pid = 0

    @property
    def armed(self) -> bool:
        return self.timeout is not None

    def arm(self, timeout: float) -> None:
        self.timeout = timeout

    def begin(self) -> None:
        """Start the clock (again: a no-op). Safe in a signal handler."""
        if self.timeout is None or self.deadline is not None:
            return
        self.deadline = time.monotonic() + self.timeout
        timer = threading.Timer(self.timeout, self._expire)
        timer.daemon = True
        timer.start()

    def end_now(self) -> None:
        """A forced stop (a second SIGINT): the deadline is now. Safe in a signal handler."""
        if self.timeout is None or self.expired:
            return
        self.deadline = time.monotonic()
        threading.Thread(target=self._expire, daemon=True).start()

    def enter(self, exchange: Cuttable) -> None:
        if self.timeout is not None:
            self._inflight[id(exchange)] = exchange

    def leave(self, exchange: Cuttable) -> None:
        if self.timeout is not None:
            self._inflight.pop(id(exchange), None)

    def wake_fd(self) -> int:
        """A file descriptor that is readable from the deadline on (one pipe per process)."""
        if self._pipe is None or self._pid != os.getpid():
            self._pipe, self._pid = os.pipe(), os.getpid()
            if self.expired:
                os.write(self._pipe[1], b"x")
        return self._pipe[0]

    def _expire(self) -> None:
        if self.expired:  # end_now() came first
            return
        self.expired = True
        if self._pipe is not None and self._pid == os.getpid():
            os.write(self._pipe[1], b"x")
        while self._inflight:
            try:
                _, exchange = self._inflight.popitem()
            except KeyError:  # a request left meanwhile
                break
            try:
                exchange.cut()
            except Exception:  # one failed cut must not spare the others
                log.exception("ending an exchange at the graceful timeout failed")


DRAIN = Drain()


def call_in_loop(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    """For a `cut()` on an event loop's exchange: run `callback` in that loop."""
    try:
        loop.call_soon_threadsafe(callback)
    except RuntimeError:  # the loop is closed: nothing is left to end
        pass


def absorb_cancel() -> bool:
    """For an `except CancelledError`: True (the cancellation undone) when the drain
    has expired. What the server's stop cancels then was ended and logged by the
    proxy already (or is the lifespan of a forced stop); uvicorn would log the
    CancelledError as a traceback."""
    if not DRAIN.expired:
        return False
    task = asyncio.current_task()
    uncancel = getattr(task, "uncancel", None)  # Python 3.11+
    if uncancel is not None:
        uncancel()
    return True
