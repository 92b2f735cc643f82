"""Which upstream of a pool takes the next attempt: balancing, in-flight counts, health.

Pure (no I/O; the clock is injected), thread-safe, one per proxy and process.
The faces ask `choose` for an attempt, `release` it once its response body has
ended or failed, and report failures (`failed`) and successes (`succeeded`);
the health probers report each probe's status (`probed`). The rules:

- `least-conn` (default): the fewest requests in flight, ties taken round-robin;
  `round-robin`: strictly in turn; `random`: the better of two random choices.
- Passive health as nginx: `max_fails` failures within `fail_timeout` seconds
  mark an upstream down for `fail_timeout` (0 disables); a failure is what
  nginx always counts as an unsuccessful attempt (error, timeout, invalid
  header: connect refused or timed out, no response head within `--timeout`,
  a connection broken before the head), never an answer, whatever its status.
  A success (a response head) clears the count and the passive mark. A pool
  of one is never marked down (nginx ignores max_fails then).
- Active health: a failed probe marks an upstream down until a probe passes
  (2xx or 3xx); a passing probe also ends a passive mark.
- Marks are a preference, never a blackout: when every upstream a request has
  not tried yet is marked down, `choose` takes among them anyway (nginx resets
  its counts then; Envoy's "panic" routing), so the answer is 502 only when the
  upstreams tried now fail. One slow request that timed out on every upstream
  marks them all, and the next request still goes to one. `choose` returns
  None only when the request has tried every upstream.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Collection, Sequence

from .upstreams import Upstream


class _State:
    __slots__ = ("inflight", "fails", "down_until", "probe_down")

    def __init__(self) -> None:
        self.inflight = 0
        self.fails: list[float] = []    # failure times within the window
        self.down_until = 0.0           # passive mark (clock time)
        self.probe_down = False         # active mark


def probe_passed(status: int | None) -> bool:
    """An active health check passes on 2xx or 3xx; None (no answer) fails."""
    return status is not None and 200 <= status < 400


class Balancer:
    """The pool's state: in-flight counts, failures, marks; `choose` decides."""

    def __init__(
        self,
        upstreams: Sequence[Upstream],
        *,
        policy: str = "least-conn",
        max_fails: int = 1,
        fail_timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.upstreams = tuple(upstreams)
        self.policy = policy
        # nginx: with a single server, max_fails is ignored (never marked down).
        self.max_fails = max_fails if len(self.upstreams) > 1 else 0
        self.fail_timeout = fail_timeout
        self._clock = clock
        self._rng = rng or random.Random()
        self._state = {u: _State() for u in self.upstreams}
        self._next = 0  # round-robin cursor
        self._lock = threading.Lock()
        # The face's active health prober feeding `probed`, when one runs (one a balancer).
        self.prober: object | None = None

    def available(self, upstream: Upstream) -> bool:
        state = self._state[upstream]
        return not state.probe_down and self._clock() >= state.down_until

    def inflight(self, upstream: Upstream) -> int:
        return self._state[upstream].inflight

    def choose(self, tried: Collection[Upstream] = ()) -> Upstream | None:
        """The upstream for the next attempt (its in-flight count taken), not one of
        `tried`; None when no other upstream is available."""
        ups = self.upstreams
        with self._lock:
            if len(ups) == 1 and not tried:  # the common case: no choice, marks or not
                chosen: Upstream | None = ups[0]
            else:
                chosen = self._pick(tried)
            if chosen is not None:
                self._state[chosen].inflight += 1
        return chosen

    def _pick(self, tried: Collection[Upstream]) -> Upstream | None:
        now = self._clock()
        ups = self.upstreams
        count = len(ups)
        state = self._state
        # The ones not tried yet, in round-robin order from the cursor; the available
        # ones among them, or all of them when every one is marked down.
        untried = [u for u in (ups[(self._next + i) % count] for i in range(count))
                   if u not in tried]
        candidates = [u for u in untried
                      if not state[u].probe_down and now >= state[u].down_until] or untried
        if not candidates:
            return None
        chosen = candidates[0]
        if self.policy == "least-conn":  # the first of a tie: round-robin order
            for upstream in candidates:
                if state[upstream].inflight < state[chosen].inflight:
                    chosen = upstream
        elif self.policy == "random" and len(candidates) > 1:
            a, b = self._rng.sample(candidates, 2)
            chosen = a if state[a].inflight <= state[b].inflight else b
        self._next = (ups.index(chosen) + 1) % count
        return chosen

    def release(self, upstream: Upstream) -> None:
        """The attempt on `upstream` is over (its body ended, failed or was never read)."""
        with self._lock:
            self._state[upstream].inflight -= 1

    def failed(self, upstream: Upstream) -> None:
        """An attempt failed on `upstream` (connect, timeout, broken before the head)."""
        if not self.max_fails:
            return
        now = self._clock()
        with self._lock:
            state = self._state[upstream]
            state.fails = [t for t in state.fails if now - t < self.fail_timeout]
            state.fails.append(now)
            if len(state.fails) >= self.max_fails:
                state.fails.clear()
                state.down_until = now + self.fail_timeout

    def succeeded(self, upstream: Upstream) -> None:
        """`upstream` answered with a head: its failure count starts again, and a
        passive mark ends (as nginx: it answered, tried while every one was marked)."""
        state = self._state[upstream]
        if state.fails or state.down_until:
            with self._lock:
                state.fails.clear()
                state.down_until = 0.0

    def probed(self, upstream: Upstream, status: int | None) -> bool:
        """An active probe's result (its status, or None when it got no answer);
        True when the upstream is now up."""
        passed = probe_passed(status)
        with self._lock:
            state = self._state[upstream]
            state.probe_down = not passed
            if passed:
                state.down_until = 0.0
                state.fails.clear()
        return passed
