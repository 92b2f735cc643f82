"""A route's rate-limit settings, checked: the rate, the key, the store (issue 21).

At the bottom of the package so that `ProxyConfig` checks a route's rate options
at construction without importing filters/ (whose rate-limit filter,
filters/ratelimit.py, applies them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import ProxyConfig

STORES = ("memory", "redis://", "rediss://", "unix://")
_UNITS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60,
          "h": 3600, "hour": 3600}
_RATE = re.compile(r"\s*(\d+)\s*/\s*([a-z]+?)s?\s*", re.IGNORECASE)
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_US = 1_000_000


@dataclass(frozen=True)
class Rate:
    """`count` requests per `period` seconds."""

    count: int
    period: int

    @property
    def interval(self) -> int:
        """Microseconds between two requests at the rate (the bucket's refill step)."""
        return max(1, round(self.period * _US / self.count))


def parse_rate(text: str) -> Rate:
    """`100/second`, `10/minute`, `1000/hour` (also s, sec, m, min, h and plurals)."""
    match = _RATE.fullmatch(text)
    unit = _UNITS.get(match[2].lower()) if match else None
    if match is None or unit is None or int(match[1]) < 1:
        raise ValueError(f"a rate is COUNT/second, /minute or /hour with COUNT >= 1 "
                         f"(e.g. 100/second), got {text!r}")
    return Rate(int(match[1]), unit)


def parse_key(text: str) -> tuple[str, bytes]:
    """`client`, `route` or `header:NAME` as (kind, lower-cased header name)."""
    kind, _, name = text.strip().partition(":")
    if kind in ("client", "route") and not name:
        return kind, b""
    if kind == "header":
        raw = name.strip().lower().encode("latin-1", "replace")
        if _TOKEN.match(raw):
            return kind, raw
    raise ValueError(f"a rate key is client, route or header:NAME (e.g. header:X-Api-Key), "
                     f"got {text!r}")


def check_store(text: str) -> str:
    """`memory` or a Redis URL (redis://, rediss://, unix://) with redis-py installed."""
    if text == "memory":
        return text
    if not text.startswith(STORES[1:]):
        raise ValueError(f"a rate limit store is memory or a redis://, rediss:// or unix:// "
                         f"URL, got {text!r}")
    try:
        import redis  # noqa: F401
    except ImportError:
        raise ValueError("a Redis rate limit store needs redis-py: "
                         "pip install 'dualproxy[ratelimit]'") from None
    return text


@dataclass(frozen=True)
class Limits:
    """A route's limits, checked (`ProxyConfig` calls `from_config` at construction)."""

    rate: Rate | None
    burst: int
    key: tuple[str, bytes]
    max_inflight: int | None
    store: str

    @classmethod
    def from_config(cls, config: ProxyConfig) -> Limits | None:
        """The route's limits, None when it has none (ValueError naming a bad option)."""
        rate = None if config.rate_limit is None else parse_rate(config.rate_limit)
        key = parse_key(config.rate_key)
        store = check_store(config.rate_limit_store)
        for what in ("rate_burst", "rate_max_inflight"):
            value = getattr(config, what)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"{what} must be a whole number >= 1, got {value!r}")
        if rate is None:
            if config.rate_burst is not None:
                raise ValueError("rate_burst needs rate_limit")
            if config.rate_max_inflight is None:
                return None
        burst = config.rate_burst or (rate.count if rate is not None else 1)
        return cls(rate, burst, key, config.rate_max_inflight, store)
