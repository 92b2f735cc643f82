"""The pure parts of a pool (DESIGN "Several upstreams, ..."): the balancer and the
retry decision, with an injected clock and no sleeps (tests/test_pool.py has the
behaviour on every pairing).
"""

from __future__ import annotations

import random

import httpx
import pytest

from dualproxy.balancer import Balancer, probe_passed
from dualproxy.config import ProxyConfig
from dualproxy.core import IncomingRequest, may_retry, plan_request
from dualproxy.upstreams import NOTHING_SENT, parse_upstream

A, B, C = (parse_upstream(f"http://10.0.0.{i}:9000") for i in (1, 2, 3))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def balancer(policy: str = "least-conn", ups: tuple[object, ...] = (A, B, C),
             **kwargs: object) -> tuple[Balancer, Clock]:
    clock = Clock()
    return Balancer(ups, policy=policy, clock=clock, **kwargs), clock  # type: ignore[arg-type]


def take(bal: Balancer, n: int) -> list[object]:
    """n sequential requests: each chosen and released at once."""
    chosen = []
    for _ in range(n):
        up = bal.choose()
        assert up is not None
        chosen.append(up)
        bal.release(up)
    return chosen


# -- the pure balancer ----------------------------------------------------------------

@pytest.mark.parametrize("policy", ["round-robin", "least-conn"])
def test_sequential_requests_alternate(policy: str) -> None:
    bal, _ = balancer(policy)
    assert take(bal, 6) == [A, B, C, A, B, C]


def test_least_conn_prefers_the_fewest_in_flight() -> None:
    bal, _ = balancer()
    first, second = bal.choose(), bal.choose()
    assert (first, second) == (A, B)
    assert bal.choose() == C
    bal.release(B)
    assert bal.choose() == B  # the only one with nothing in flight
    assert [bal.inflight(u) for u in (A, B, C)] == [1, 1, 1]


def test_round_robin_ignores_in_flight_counts() -> None:
    bal, _ = balancer("round-robin")
    assert [bal.choose() for _ in range(4)] == [A, B, C, A]
    assert bal.inflight(A) == 2


def test_random_takes_the_better_of_two() -> None:
    bal, _ = balancer("random", ups=(A, B), rng=random.Random(1))
    busy = bal.choose()
    assert busy is not None
    other = B if busy == A else A
    # Two choices out of two: always the one with nothing in flight.
    assert take(bal, 5) == [other] * 5


def test_choose_skips_the_tried_and_none_when_all_are() -> None:
    bal, _ = balancer()
    assert bal.choose(tried=[A]) == B
    assert bal.choose(tried=[A, B, C]) is None


def test_failures_mark_down_for_fail_timeout() -> None:
    bal, clock = balancer(max_fails=2, fail_timeout=10.0)
    bal.failed(A)
    assert bal.available(A)
    clock.now += 11  # the first failure left the window
    bal.failed(A)
    assert bal.available(A)
    clock.now += 1
    bal.failed(A)
    assert not bal.available(A)
    assert take(bal, 4) == [B, C, B, C]
    clock.now += 10
    assert bal.available(A)


def test_success_clears_the_failure_count() -> None:
    bal, _ = balancer(max_fails=2)
    bal.failed(A)
    bal.succeeded(A)
    bal.failed(A)
    assert bal.available(A)


def test_all_down_are_tried_anyway_and_max_fails_zero_never_marks() -> None:
    """Marks are a preference, never a blackout: with every upstream marked down,
    requests still go to them (in turn); only a request that tried all gets None."""
    bal, _ = balancer(ups=(A, B))
    bal.failed(A)
    bal.failed(B)
    assert not bal.available(A) and not bal.available(B)
    assert set(take(bal, 2)) == {A, B}
    assert bal.choose(tried=[A]) == B
    assert bal.choose(tried=[A, B]) is None
    never, _ = balancer(max_fails=0)
    for _ in range(5):
        never.failed(A)
    assert never.available(A)


def test_a_pool_of_one_is_never_marked_down() -> None:
    bal, _ = balancer(ups=(A,))
    bal.failed(A)
    assert bal.choose() == A
    bal.probed(A, None)  # down by its health check: tried anyway, it is all there is
    assert bal.choose() == A


def test_one_slow_request_never_takes_the_pool_down() -> None:
    """A GET timing out on A, retried on B and timing out there too, marks both (a head
    timeout is a failure, as nginx counts it); the next requests still go to them, and
    the first answer ends that upstream's mark."""
    bal, clock = balancer(ups=(A, B), fail_timeout=10.0)
    first = bal.choose()
    assert first == A
    bal.failed(A)
    assert bal.choose(tried=[A]) == B
    bal.failed(B)
    bal.release(A)
    bal.release(B)
    clock.now += 1
    nxt = bal.choose()
    assert nxt in (A, B)
    bal.succeeded(nxt)
    bal.release(nxt)
    assert bal.available(nxt)
    other = B if nxt == A else A
    assert not bal.available(other)
    assert take(bal, 3) == [nxt] * 3  # the one that answered is preferred again


def test_probes_mark_down_and_bring_back() -> None:
    bal, _ = balancer(ups=(A, B))
    assert bal.probed(A, None) is False
    assert take(bal, 3) == [B, B, B]
    bal.failed(B)  # passive mark too: every one is marked, so both are tried
    assert set(take(bal, 2)) == {A, B}
    assert bal.probed(B, 204) is True  # a passing probe ends the passive mark
    assert bal.probed(A, 302) is True
    assert set(take(bal, 2)) == {A, B}
    assert [probe_passed(s) for s in (None, 199, 200, 399, 400, 503)] == [
        False, False, True, True, False, False]


# -- the retry decision -----------------------------------------------------------------

def plan(method: str, body: bool) -> object:
    config = ProxyConfig("http://10.0.0.1:9000")
    headers = [(b"host", b"x")] + ([(b"content-length", b"3")] if body else [])
    return plan_request(config, IncomingRequest(method, b"/", headers, "127.0.0.1"))


def unsent(exc: Exception) -> Exception:
    setattr(exc, NOTHING_SENT, True)
    return exc


@pytest.mark.parametrize(("method", "body", "exc", "expected"), [
    ("POST", True, httpx.ConnectError("refused"), True),        # never sent
    ("POST", True, httpx.ConnectTimeout("slow"), True),
    ("POST", True, unsent(httpx.RemoteProtocolError("closed")), True),  # reused, closed
    ("POST", True, httpx.RemoteProtocolError("closed"), False),  # a body went out
    ("POST", False, httpx.ReadError("reset"), False),            # not idempotent
    ("PUT", True, httpx.ReadTimeout("slow"), False),             # idempotent, but a body
    ("GET", False, httpx.ReadTimeout("slow"), True),
    ("DELETE", False, httpx.RemoteProtocolError("closed"), True),
    ("GET", False, httpx.PoolTimeout("busy"), False),            # ours, not the upstream's
    ("GET", False, httpx.LocalProtocolError("bad body"), False),
])
def test_may_retry(method: str, body: bool, exc: Exception, expected: bool) -> None:
    assert may_retry(plan(method, body), exc) is expected  # type: ignore[arg-type]
