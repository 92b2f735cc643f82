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
import select
import threading
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

# What the servers get beyond the deadline: time to send close frames and log.
SLACK = 1.0

log = logging.getLogger("dualproxy")


class Cuttable(Protocol):
    def cut(self) -> None: ...


@runtime_checkable
class Upgraded(Cuttable, Protocol):
    """An exchange on a connection the server handed over (a WebSocket session):
    `ended` is done once it has closed both sides."""

    ended: asyncio.Future[None]


class Drain:
    """One per process (`DRAIN`): armed with a timeout, begun once, expired once.

    `begin` and `end_now` run inside signal handlers: they only set the deadline
    and write a byte to a pipe. The thread that keeps the clock is started by
    `arm` (in the worker process, outside any handler): a handler that started a
    thread could deadlock on a lock the interrupted code holds (threading's own,
    taken by every Thread.start). An exchange registered after the deadline is
    cut at once: nothing may start its wait when the proxy has stopped waiting.
    """

    def __init__(self) -> None:
        self.timeout: float | None = None
        self.deadline: float | None = None  # time.monotonic() at which cut() runs
        self.expired = False
        self._inflight: dict[int, Cuttable] = {}
        self._lock = threading.Lock()
        self._pid = 0  # the process whose pipes and clock thread these are
        self._wake: tuple[int, int] | None = None   # readable from the deadline on
        self._poke: tuple[int, int] | None = None   # begin/end_now wake the clock

    @property
    def armed(self) -> bool:
        return self.timeout is not None

    def arm(self, timeout: float) -> None:
        """Arm with `timeout` and start the clock thread (idle until `begin`)."""
        self.timeout = timeout
        self._start()

    def _start(self) -> None:
        """The pipes and the clock thread of this process, made once (under the lock:
        two threads asking at once must not make two wake pipes)."""
        with self._lock:
            if self._pid == os.getpid():
                return
            wake, poke = os.pipe(), os.pipe()
            os.set_blocking(poke[1], False)
            if self.expired:
                os.write(wake[1], b"x")
            self._wake, self._poke, self._pid = wake, poke, os.getpid()
            threading.Thread(target=self._keep_time, args=(poke[0],),
                             name="dualproxy-drain", daemon=True).start()

    def begin(self) -> None:
        """Start the clock (again: a no-op). Safe in a signal handler."""
        if self.timeout is None or self.deadline is not None:
            return
        self.deadline = time.monotonic() + self.timeout
        self._wake_clock()

    def end_now(self) -> None:
        """A forced stop (a second SIGINT): the deadline is now. Safe in a signal handler."""
        if self.timeout is None or self.expired:
            return
        self.deadline = time.monotonic()
        self._wake_clock()

    def _wake_clock(self) -> None:
        poke = self._poke
        if poke is None or self._pid != os.getpid():
            self._start()  # armed in a parent process (not as `dualproxy serve` runs)
            poke = self._poke
        assert poke is not None
        try:
            os.write(poke[1], b"x")
        except BlockingIOError:  # the pipe is full of earlier wake-ups: awake anyway
            pass

    def _keep_time(self, poke: int) -> None:
        """The clock thread: sleeps until the deadline (set or moved by a wake-up)."""
        while True:
            deadline = self.deadline
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                self._expire()
                return
            ready, _, _ = select.select([poke], [], [], wait)
            if ready:
                os.read(poke, 512)

    def enter(self, exchange: Cuttable) -> None:
        if self.timeout is None:
            return
        key = id(exchange)
        self._inflight[key] = exchange
        # Past the deadline `_expire` has run (or is running): whichever of the two
        # takes the exchange out of the registry cuts it, exactly once.
        if self.expired and self._inflight.pop(key, None) is not None:
            self._cut(exchange)

    def leave(self, exchange: Cuttable) -> None:
        if self.timeout is not None:
            self._inflight.pop(id(exchange), None)

    def cut_upgraded(self) -> list[Upgraded]:
        """Cut the registered upgraded exchanges (WebSocket sessions) now, before the
        deadline, and return them: for a server that cannot keep them until then
        (granian, whose stop ends them at once). The rest keep draining."""
        chosen = [exchange for exchange in list(self._inflight.values())
                  if isinstance(exchange, Upgraded)]
        for exchange in chosen:
            if self._inflight.pop(id(exchange), None) is not None:
                self._cut(exchange)
        return chosen

    def wake_fd(self) -> int:
        """A file descriptor that is readable from the deadline on (one pipe per process)."""
        if self._pid != _PROCESS[0]:
            self._start()
        assert self._wake is not None
        return self._wake[0]

    def _expire(self) -> None:
        with self._lock:
            if self.expired:
                return
            self.expired = True
            if self._wake is not None and self._pid == os.getpid():
                os.write(self._wake[1], b"x")
        while self._inflight:
            try:
                _, exchange = self._inflight.popitem()
            except KeyError:  # a request left meanwhile
                break
            self._cut(exchange)

    @staticmethod
    def _cut(exchange: Cuttable) -> None:
        try:
            exchange.cut()
        except Exception:  # one failed cut must not spare the others
            log.exception("ending an exchange at the graceful timeout failed")


DRAIN = Drain()
# This process's id for `wake_fd`, asked for by every WSGI request: getpid is a
# system call, so the id is kept here and renewed in a forked child.
_PROCESS = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _PROCESS.__setitem__(0, os.getpid()))


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
