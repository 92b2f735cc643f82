"""Prometheus metrics of the proxy (the optional `metrics` extra: prometheus_client).

Imported only when metrics are on (`AsyncProxy(..., metrics=True)`, `dualproxy
serve --metrics-bind`): the core never needs prometheus_client. The access log
hands every finished `RequestRecord` to `ProxyMetrics.finished` (logs.py), so
both faces, HTTP and WebSocket, count alike. One `ProxyMetrics` per registry,
shared by every proxy on it; requests are told apart by `route` (the mount).

Under several worker processes prometheus_client's multiprocess mode keeps the
values in files in PROMETHEUS_MULTIPROC_DIR (set before the workers import it;
`dualproxy serve` does); a `MultiProcessCollector` sums them (servers/metrics.py).
The gauges are `livesum`/`livemin`: a dead worker's share is dropped.

Requests outside every mount count only in `requests_total{route="none"}`:
no per-route series (bytes, latencies, errors) exists for them.

The per-upstream gauges (`upstream_up`, `pool_connections_in_use`) read the
face's balancer (`watch_health`, `watch_pool`): scrape time in one process,
sampled as requests end in worker processes.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, values

from .core import PROXY_METHODS
from .errors import UPSTREAM_CAUSES
from .logs import RequestRecord

# The label for a request outside the mount (no route) and for no status sent (the
# client left first); a mount always starts with "/", so neither is ambiguous.
NONE = "none"
_METHODS = frozenset(PROXY_METHODS)
# Seconds to the upstream's response head; up to the default --timeout and beyond.
HEAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Seconds a whole request took: as the head, then long downloads and streams.
DURATION_BUCKETS = (*HEAD_BUCKETS, 300.0, 1800.0, 3600.0)

_made_lock = threading.Lock()
_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, ProxyMetrics] = (
    weakref.WeakKeyDictionary())


def status_class(status: int) -> str:
    """`2xx` for 200-299 and so on; `none` when no status was sent."""
    return f"{status // 100}xx" if 100 <= status <= 599 else NONE


def method_label(method: str) -> str:
    """The method, or `other` for one the proxy does not route (bounded cardinality)."""
    return method if method in _METHODS else "other"


class _Route:
    """The children of one route's per-route series, looked up once."""

    __slots__ = ("route", "bytes_in", "bytes_out", "head", "duration", "aborts", "requests",
                 "errors", "rate_limited", "limit_skipped", "cache_store_failed")

    def __init__(self, metrics: ProxyMetrics, route: str) -> None:
        self.route = route
        self.bytes_in = metrics.request_bytes.labels(route)
        self.bytes_out = metrics.response_bytes.labels(route)
        self.head = metrics.upstream_head.labels(route)
        self.duration = metrics.request_duration.labels(route)
        self.aborts = metrics.client_aborts.labels(route)
        self.rate_limited = metrics.rate_limited.labels(route)
        self.limit_skipped = metrics.rate_limit_store_errors.labels(route)
        self.cache_store_failed = metrics.cache_store_errors.labels(route)
        self.requests: dict[tuple[str, int], Any] = {}
        self.errors = {cause: metrics.upstream_errors.labels(route, cause)
                       for cause in UPSTREAM_CAUSES}


class ProxyMetrics:
    """The metric objects on one registry and their per-request updates."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(f"dualproxy_{name}", doc, labels, registry=registry)

        def gauge(name: str, doc: str, mode: Any, *labels: str) -> Gauge:
            return Gauge(f"dualproxy_{name}", doc, labels, registry=registry,
                         multiprocess_mode=mode)

        self.requests = counter("requests", "Requests answered, by route, method "
                                "(other: not a proxied method) and status class",
                                "route", "method", "status_class")
        self.request_bytes = counter("request_bytes", "Request body bytes taken from "
                                     "clients (WebSocket: sent upstream)", "route")
        self.response_bytes = counter("response_bytes", "Response body bytes sent to "
                                      "clients (WebSocket: from upstream)", "route")
        self.upstream_errors = counter("upstream_errors", "Requests that failed on the "
                                       "upstream side, by cause", "route", "cause")
        self.client_aborts = counter("client_aborts", "Requests whose client left before "
                                     "the answer was complete (no status sent)", "route")
        self.rate_limited = counter("rate_limited", "Requests refused by the route's rate "
                                    "limit (429: over the rate, or too many in flight)",
                                    "route")
        self.rate_limit_store_errors = counter(
            "rate_limit_store_errors", "Requests let through unchecked because the rate "
            "limit's store failed (Redis down: the limit steps aside)", "route")
        self.request_duration = Histogram("dualproxy_request_duration_seconds", "Seconds "
                                          "from the request's arrival to its end (the last "
                                          "body byte sent, or the abort)", ("route",),
                                          registry=registry, buckets=DURATION_BUCKETS)
        self.upstream_head = Histogram("dualproxy_upstream_head_seconds", "Seconds from "
                                       "the request's arrival to the upstream's response "
                                       "head", ("route",), registry=registry,
                                       buckets=HEAD_BUCKETS)
        self.cache_requests = counter("cache_requests", "Requests on routes with the HTTP "
                                      "cache, by what the cache did (hit, miss, stale, "
                                      "revalidated, bypass, collapsed, purge)",
                                      "route", "result")
        self.cache_stored_bytes = counter("cache_stored_bytes", "Response body bytes the "
                                          "HTTP cache stored", "route")
        self.cache_store_errors = counter(
            "cache_store_errors", "Requests the HTTP cache served uncached because its "
            "store failed (Redis down: the cache steps aside)", "route")
        self.in_flight = gauge("requests_in_flight", "Requests begun and not finished "
                               "(open WebSocket sessions included)", "livesum")
        self.websocket_sessions = gauge("websocket_sessions", "Open WebSocket sessions",
                                        "livesum")
        self.upstream_up = gauge("upstream_up", "1 when the upstream is taken for "
                                 "healthy (the lowest over workers)", "livemin", "upstream")
        self.pool_in_use = gauge("pool_connections_in_use", "Upstream connections in use "
                                 "(worker processes: as their last request ended)",
                                 "livesum", "upstream")
        self._routes: dict[str, _Route] = {}
        self._unrouted: dict[tuple[str, int], Any] = {}
        self._watched: dict[tuple[str, str], tuple[Any, Callable[[], float], list[float]]] = {}

    @classmethod
    def on(cls, registry: CollectorRegistry | None = None) -> ProxyMetrics:
        """The metrics on `registry` (default: prometheus_client's), made once."""
        registry = REGISTRY if registry is None else registry
        with _made_lock:  # two at once would register the same names twice
            metrics = _by_registry.get(registry)
            if metrics is None:
                metrics = _by_registry[registry] = cls(registry)
        return metrics

    def watch_pool(self, upstream: str, in_use: Callable[[], int]) -> None:
        """Report `in_use()` as the upstream's pool gauge (connections in use)."""
        self._watch(self.pool_in_use.labels(upstream), ("pool", upstream), in_use)

    def watch_health(self, upstream: str, available: Callable[[], bool]) -> None:
        """Report `available()` as the upstream's `upstream_up` gauge."""
        self._watch(self.upstream_up.labels(upstream), ("up", upstream), available)

    def _watch(self, child: Any, key: tuple[str, str], read: Callable[[], float]) -> None:
        """Report `read()` on a gauge (the latest proxy's: a rebuilt one replaces it).
        In one process it is read at scrape time; worker processes cannot be asked
        then, so each samples it as its requests end."""
        if values.ValueClass is values.MutexValue:  # not multiprocess mode
            child.set_function(lambda: float(read()))
            self._watched.pop(key, None)
        else:
            self._watched[key] = (child, read, [-1.0])
            child.set(float(read()))

    def sample_watched(self) -> None:
        for child, read, last in self._watched.values():
            now = float(read())
            if now != last[0]:  # a write less per request (a locked file write per worker)
                last[0] = now
                child.set(now)

    # -- the RequestObserver the access log calls --------------------------------------

    def started(self) -> None:
        self.in_flight.inc()

    def passed_on(self) -> None:
        self.in_flight.dec()

    def session_opened(self) -> None:
        self.websocket_sessions.inc()

    def finished(self, record: RequestRecord, route: str | None) -> None:
        if route is None:  # outside every mount: counted, nothing else to say
            self._count(self._unrouted, NONE, record)
        else:
            self._finished_routed(record, route)
        if record.websocket:
            self.websocket_sessions.dec()
        self.in_flight.dec()
        if self._watched:
            self.sample_watched()

    def _count(self, children: dict[tuple[str, int], Any], route: str,
               record: RequestRecord) -> None:
        key = (record.method, record.status)
        requests = children.get(key)
        if requests is None:
            requests = children[key] = self.requests.labels(
                route, method_label(record.method), status_class(record.status))
        requests.inc()

    def _finished_routed(self, record: RequestRecord, route: str) -> None:
        series = self._routes.get(route)
        if series is None:
            series = self._routes[route] = _Route(self, route)
        self._count(series.requests, route, record)
        if record.cache is not None:
            self.cache_requests.labels(route, record.cache).inc()
            if record.cache_stored:
                self.cache_stored_bytes.labels(route).inc(record.cache_stored)
        if record.bytes_in:
            series.bytes_in.inc(record.bytes_in)
        if record.bytes_out:
            series.bytes_out.inc(record.bytes_out)
        if record.upstream_at is not None:
            series.head.observe(record.upstream_at - record.started)
        series.duration.observe(time.perf_counter() - record.started)
        outcome, cause = record.ending()
        if cause is not None:
            series.errors[cause].inc()
        if outcome == "client-gone":
            series.aborts.inc()
        elif outcome == "rate-limited":
            series.rate_limited.inc()
        if record.limit_skipped:
            series.limit_skipped.inc()
        if record.cache_store_failed:
            series.cache_store_failed.inc()
