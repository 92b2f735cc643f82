"""Rate limits per route: a built-in filter (issue 21), the same on both faces.

Semantics: nginx's `limit_req` with `nodelay`, written as GCRA (the generic cell
rate algorithm, a token bucket kept as one timestamp per key): a rate (`100/second`)
refills a bucket of `burst` requests (default: the rate's count); a request finding
it empty is refused at once with 429, never queued or delayed. Per key: the
client's address (after trusted proxies; the default), a request header
(`header:X-Api-Key`; a request without it is keyed by its client's address), or the
route as a whole. An optional cap of requests in flight per key (nginx's
`limit_conn`) refuses with 429 too, released when the exchange ends (`on_end`).

Stores:
- `memory` (default): one bucket table per route and worker process, under a lock:
  exact under the sync face's threads and the async face's one loop. N workers
  admit N times the rate (documented).
- `redis://...` (`ratelimit` extra: redis-py, its sync client on the sync face and
  its asyncio client on the async face): one Lua script of ours, run atomically by
  Redis on its own clock, so every worker of every proxy instance shares one
  exact bucket per key. Not the `limits` library: its strategies are fixed,
  moving and sliding windows, none a token bucket with a burst apart from the
  rate, so nginx's semantics (and `Retry-After` to the microsecond bucket) need
  our own script. A store that fails steps aside: the request passes, a WARNING
  once per outage, `dualproxy_rate_limit_store_errors_total`, no retry for a second.

Answers of a limited route carry the IETF fields, refused or not, as
draft-ietf-httpapi-ratelimit-headers-10 (27 September 2025) writes them:
`RateLimit-Policy: "default";q=100;w=1` (quota q per window of w seconds) and
`RateLimit: "default";r=42;t=1` (r requests left now, t seconds until the bucket
is full again); a refusal adds `Retry-After` (whole seconds, rounded up).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..core import ResponseHead
from ..errors import ProxyError
from ..rates import _US, STORES, Limits, Rate, check_store, parse_key, parse_rate
from .base import Answer, Exchange, Filter

if TYPE_CHECKING:
    from ..config import ProxyConfig

error_logger = logging.getLogger("dualproxy")

OUTCOME = "rate-limited"  # the access log's outcome of a refusal (RequestRecord.outcome)
_STEP_ASIDE = 1.0  # seconds a failed store is left alone before it is asked again


# The settings (rates.py): re-exported for the filter's users.
__all__ = ["OUTCOME", "STORES", "Limits", "Rate", "check_store", "parse_key", "parse_rate"]


# -- the bucket math (GCRA), in integer microseconds ------------------------------------

def gcra(stored: int | None, now: int, interval: int, burst: int) -> tuple[bool, int]:
    """One request against a key whose theoretical arrival time is `stored` (None:
    a full bucket): (allowed, the time to keep). The Lua script is this, in Lua."""
    tat = now if stored is None or stored < now else stored
    new_tat = tat + interval
    if new_tat - burst * interval > now:
        return False, tat
    return True, new_tat


@dataclass(frozen=True)
class Decision:
    """What a request's check says: allowed or not, requests left now, seconds until
    the next one is allowed (0 when this one was) and until the bucket is full."""

    allowed: bool
    remaining: int
    retry_after: float
    reset: float

    @classmethod
    def of(cls, allowed: bool, now: int, tat: int, interval: int, burst: int) -> Decision:
        reset = max(0, tat - now) / _US
        if allowed:
            return cls(True, max(0, (now - tat + burst * interval) // interval), 0.0, reset)
        return cls(False, 0, (tat + interval - burst * interval - now) / _US, reset)


def _monotonic_us() -> int:
    return time.monotonic_ns() // 1000


class MemoryStore:
    """The buckets and in-flight counts of one route in this process, under one lock
    (held for a few dict operations, never across an await)."""

    def __init__(self, clock: Callable[[], int] = _monotonic_us) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._tats: dict[bytes, int] = {}
        self._inflight: dict[bytes, int] = {}
        self._sweep_at = 1024

    def hit(self, key: bytes, interval: int, burst: int) -> Decision:
        with self._lock:
            now = self.clock()
            allowed, tat = gcra(self._tats.get(key), now, interval, burst)
            if allowed:
                self._tats[key] = tat
                if len(self._tats) >= self._sweep_at:
                    self._sweep(now)
        return Decision.of(allowed, now, tat, interval, burst)

    def _sweep(self, now: int) -> None:
        """Forget the full buckets (a full bucket is no entry): the table stays the
        size of the keys seen within one burst's refill time."""
        self._tats = {k: tat for k, tat in self._tats.items() if tat > now}
        self._sweep_at = max(1024, 2 * len(self._tats))

    def enter(self, key: bytes, cap: int) -> bool:
        with self._lock:
            count = self._inflight.get(key, 0)
            if count >= cap:
                return False
            self._inflight[key] = count + 1
            return True

    def leave(self, key: bytes) -> None:
        with self._lock:
            count = self._inflight.pop(key, 0) - 1
            if count > 0:
                self._inflight[key] = count


# One memory store per route config object (by identity, forgotten with it): a WSGI
# face and its ASGI WebSocket twin (router.py) share a config, and so the buckets.
_memory: dict[int, MemoryStore] = {}
_memory_lock = threading.Lock()


def memory_store(config: ProxyConfig) -> MemoryStore:
    with _memory_lock:
        store = _memory.get(id(config))
        if store is None:
            store = _memory[id(config)] = MemoryStore()
            weakref.finalize(config, _memory.pop, id(config), None)
        return store


# -- Redis ---------------------------------------------------------------------------

# KEYS[1]: the key's theoretical arrival time, microseconds on Redis's clock;
# ARGV: the interval (microseconds) and the burst. Returns {allowed, now, tat}
# as strings (Lua prints a number with 14 digits: microseconds since 1970 have 16).
LUA_GCRA = """
if redis.replicate_commands then redis.replicate_commands() end -- Redis < 5: TIME, then SET
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
if new_tat - burst * interval > now then
  return {0, string.format('%.0f', now), string.format('%.0f', tat)}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat),
           'PX', string.format('%.0f', math.ceil((new_tat - now) / 1000) + 1))
return {1, string.format('%.0f', now), string.format('%.0f', new_tat)}
"""


def _where(url: str) -> str:
    """The store's URL for a log line, without its password."""
    return re.sub(r"//[^@/]*@", "//", url)


class _Outage:
    """A failing store steps aside: the request passes, a WARNING once per outage,
    and the store is left alone for `_STEP_ASIDE` seconds before it is asked again."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.down = False
        self.retry_at = 0.0
        self._lock = threading.Lock()  # threads failing at once: one WARNING

    def skipping(self) -> bool:
        return self.down and time.monotonic() < self.retry_at

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            was_down, self.down = self.down, True
            self.retry_at = time.monotonic() + _STEP_ASIDE
        if not was_down:
            error_logger.warning("rate limit store %s failed (%s: %s): the limit steps "
                                 "aside, requests pass until it answers again",
                                 _where(self.url), type(exc).__name__, exc)

    def answered(self) -> None:
        if self.down:
            with self._lock:
                was_down, self.down = self.down, False
            if was_down:
                error_logger.info("rate limit store %s answers again: the limit is back",
                                  _where(self.url))


def _decided(reply: Any, interval: int, burst: int) -> Decision:
    allowed, now, tat = (int(value) for value in reply)
    return Decision.of(bool(allowed), now, tat, interval, burst)


# A store that does not answer in half a second steps aside (the request passes); one
# immediate retry on a fresh connection (a pooled one Redis closed), never redis-py 6's
# default of three with seconds of backoff.
_REDIS_TIMEOUT = 0.5


class RedisStore:
    """The buckets in Redis, through redis-py's sync client (the sync face)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.outage = _Outage(url)
        self._script: Any = None
        self._lock = threading.Lock()

    def _made(self) -> Any:
        with self._lock:  # made on first use: after a pre-fork server has forked
            if self._script is None:
                import redis
                from redis.backoff import NoBackoff
                from redis.retry import Retry

                client = redis.Redis.from_url(
                    self.url, socket_timeout=_REDIS_TIMEOUT,
                    socket_connect_timeout=_REDIS_TIMEOUT, retry=Retry(NoBackoff(), 1))
                self._script = client.register_script(LUA_GCRA)
        return self._script

    def hit(self, key: bytes, interval: int, burst: int) -> Decision | None:
        """The decision, or None when the store failed (the limit steps aside)."""
        if self.outage.skipping():
            return None
        try:
            reply = (self._script or self._made())(keys=[key], args=[interval, burst])
        except Exception as exc:  # redis.RedisError, OSError: never a 5xx for it
            self.outage.failed(exc)
            return None
        self.outage.answered()
        return _decided(reply, interval, burst)

    def close(self) -> None:
        """Close the client's connections (a next `hit` opens others)."""
        if self._script is not None:
            self._script.registered_client.close()


class AsyncRedisStore(RedisStore):
    """The same script through redis-py's asyncio client (the async face), made in the
    running loop (again if another loop runs this proxy later)."""

    _loop: asyncio.AbstractEventLoop | None = None

    def _made(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._script is None or self._loop is not loop:
            self._loop = loop
            import redis.asyncio
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            client = redis.asyncio.Redis.from_url(
                self.url, socket_timeout=_REDIS_TIMEOUT, socket_connect_timeout=_REDIS_TIMEOUT,
                retry=Retry(NoBackoff(), 1))
            self._script = client.register_script(LUA_GCRA)
        return self._script

    async def aclose(self) -> None:
        """Close the client's connections, from the loop that uses them."""
        if self._script is not None:
            await self._script.registered_client.aclose()

    async def ahit(self, key: bytes, interval: int, burst: int) -> Decision | None:
        if self.outage.skipping():
            return None
        try:
            reply = await self._made()(keys=[key], args=[interval, burst])
        except Exception as exc:
            self.outage.failed(exc)
            return None
        self.outage.answered()
        return _decided(reply, interval, burst)


# -- the filter ----------------------------------------------------------------------

class TooManyRequests(ProxyError):
    status = 429


_STATE = object()  # exchange.state key: the request's Decision (None: no rate checked)
_HELD = object()  # exchange.state key: the key whose in-flight slot this exchange holds


class RateLimit(Filter):
    """The route's limits on the sync face, and on the async face with the memory store
    (no I/O: plain `def`s run on both)."""

    name = "rate_limit"

    def __init__(self, limits: Limits, route: bytes, memory: MemoryStore,
                 redis: RedisStore | None = None) -> None:
        self.limits = limits
        self.memory = memory
        self.redis = redis
        self.route = route
        self.prefix = b"dualproxy:ratelimit:" + (route or b"/") + b":"
        rate = limits.rate
        self.policy = (f'"default";q={rate.count};w={rate.period}'.encode()
                       if rate is not None else b"")

    def key(self, exchange: Exchange) -> bytes:
        kind, name = self.limits.key
        if kind == "header":
            values = [v for n, v in exchange.incoming.headers if n == name]
            if values:  # hashed: API keys are secrets, not Redis key names for all to read
                return b"header:" + hashlib.blake2b(b",".join(values),
                                                    digest_size=16).hexdigest().encode()
        elif kind == "route":
            return b"route"
        return b"client:" + (exchange.client or "-").encode("latin-1", "replace")

    def on_request(self, exchange: Exchange) -> Answer | None:
        key = self.key(exchange)
        rate = self.limits.rate
        if rate is None:
            return self._enter(exchange, key)
        if self.redis is None:
            decision: Decision | None = self.memory.hit(key, rate.interval, self.limits.burst)
        else:
            decision = self.redis.hit(self.prefix + key, rate.interval, self.limits.burst)
        return self._decided(exchange, key, decision)

    def _decided(self, exchange: Exchange, key: bytes,
                 decision: Decision | None) -> Answer | None:
        if decision is None:
            exchange.record.limit_skipped = True
            return self._enter(exchange, key)
        exchange.state[_STATE] = decision
        if not decision.allowed:
            return self._refuse(exchange, decision.retry_after,
                                "too many requests: the rate limit is reached")
        return self._enter(exchange, key)

    def _enter(self, exchange: Exchange, key: bytes) -> Answer | None:
        cap = self.limits.max_inflight
        if cap is None:
            return None
        if not self.memory.enter(key, cap):
            return self._refuse(exchange, 1.0,
                                "too many requests: the requests in flight are at the limit")
        exchange.state[_HELD] = key
        return None

    def _refuse(self, exchange: Exchange, retry_after: float, detail: str) -> Answer:
        exchange.record.outcome = OUTCOME
        error = TooManyRequests(detail)
        headers = [*error.headers(),
                   (b"retry-after", str(max(1, math.ceil(retry_after))).encode())]
        headers += self._fields(exchange)
        return Answer(429, headers, error.body())

    def _fields(self, exchange: Exchange) -> list[tuple[bytes, bytes]]:
        decision = exchange.state.get(_STATE)
        if decision is None:
            return []
        reset = math.ceil(decision.reset)
        return [(b"ratelimit-policy", self.policy),
                (b"ratelimit", b'"default";r=%d;t=%d' % (decision.remaining, reset))]

    def on_response(self, exchange: Exchange, head: ResponseHead) -> None:
        fields = self._fields(exchange)
        if fields:
            names = {name for name, _ in fields}
            head.headers[:] = [(n, v) for n, v in head.headers
                               if n.lower() not in names] + fields
        return None

    def on_end(self, exchange: Exchange) -> None:
        key = exchange.state.pop(_HELD, None)
        if key is not None:
            self.memory.leave(key)

    def close(self) -> None:
        """Close the Redis store's connections (the sync face's proxy closing)."""
        if self.redis is not None:
            self.redis.close()


class AsyncRateLimit(RateLimit):
    """A Redis store on the async face: the script is awaited."""

    redis: AsyncRedisStore

    async def on_request(self, exchange: Exchange) -> Answer | None:  # type: ignore[override]
        key = self.key(exchange)
        rate = self.limits.rate
        assert rate is not None
        decision = await self.redis.ahit(self.prefix + key, rate.interval, self.limits.burst)
        return self._decided(exchange, key, decision)

    async def aclose(self) -> None:
        """Close the asyncio Redis client from its loop (the async face, at lifespan end)."""
        await self.redis.aclose()

    def for_sync_face(self) -> Filter:
        return RateLimit(self.limits, self.route, self.memory, RedisStore(self.limits.store))


def rate_limit(config: ProxyConfig) -> Filter | None:
    """The route's rate-limit filter (None when it has no limits). A Redis store gives
    the async form; the sync face takes its sync twin (`Filter.for_sync_face`)."""
    limits = Limits.from_config(config)
    if limits is None:
        return None
    route = config.mount.encode("ascii")
    memory = memory_store(config)
    if limits.store == "memory" or limits.rate is None:
        return RateLimit(limits, route, memory)
    return AsyncRateLimit(limits, route, memory, AsyncRedisStore(limits.store))
