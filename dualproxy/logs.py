"""One access-log line per proxied request, through the standard `logging` module.

Logger `dualproxy.access` gets the line at INFO; expected failures (a refused
upstream, a vanished client) are logged once on `dualproxy` with their cause,
never as tracebacks. Both faces feed the same `RequestRecord`, so the lines
read the same whatever the face. The `json` format makes the message one JSON
object (`dualproxy serve` then writes it alone on its line). An optional
`RequestObserver` (the Prometheus metrics, metrics.py) sees the same records.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Protocol

from .core import IncomingRequest
from .errors import NotProxied, ProxyError, ShuttingDown, describe, upstream_cause
from .upstreams import Upstream

FORMATS = ("text", "json")

access_logger = logging.getLogger("dualproxy.access")
error_logger = logging.getLogger("dualproxy")


class RequestRecord:
    """What one request did: sizes each way, status, timings, how it ended."""

    __slots__ = ("method", "target", "started", "upstream_at", "status", "bytes_in",
                 "bytes_out", "client_gone", "broken", "responded", "problem", "shutdown",
                 "routed", "upstream", "cause", "websocket")

    def __init__(self, incoming: IncomingRequest) -> None:
        self.method = incoming.method
        self.target = incoming.target
        self.started = time.perf_counter()
        self.upstream_at: float | None = None
        self.status = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.client_gone = False
        self.broken: str | None = None
        self.responded = False
        self.problem: str | None = None
        self.shutdown = False  # cut by the server's stop after the graceful timeout
        self.routed = True  # False: outside the mount, no upstream was chosen
        self.upstream: Upstream | None = None  # the one chosen (the last one tried)
        self.cause: str | None = None  # why the upstream side failed (errors.UPSTREAM_CAUSES)
        self.websocket = False  # an accepted WebSocket session, open until finish

    def upstream_status(self, status: int) -> None:
        self.upstream_at = time.perf_counter()
        self.status = status

    def upstream_broke(self, exc: BaseException) -> None:
        """The upstream failed after the head was sent: the client connection is aborted."""
        self.broken = describe(exc)
        self.cause = upstream_cause(exc)

    def ending(self) -> tuple[str, str | None]:
        """How the request ended: the access log's outcome and the metrics' error cause."""
        if self.shutdown:
            return "shutdown-cut", "other"
        if self.client_gone:
            return "client-gone", "client_gone"
        return ("upstream-broken" if self.broken else "ok"), self.cause


class RequestObserver(Protocol):
    """What sees every record besides the log line (metrics.ProxyMetrics)."""

    def started(self) -> None: ...

    def passed_on(self) -> None: ...

    def session_opened(self) -> None: ...

    def finished(self, record: RequestRecord, route: str | None) -> None: ...


class AccessLog:
    """Creates records and writes their lines; `enabled=False` keeps only error lines.

    `route` (the mount) and the chosen upstream (until one is chosen: `upstream`,
    empty for a pool) name where a routed request went, for json.
    """

    def __init__(self, *, enabled: bool = True, format: str = "text",
                 upstream: str = "", route: str = "/") -> None:
        if format not in FORMATS:
            raise ValueError(f"access log format must be one of {FORMATS}, got {format!r}")
        self.enabled = enabled
        self.format = format
        self.upstream = upstream
        self.route = route
        self.observer: RequestObserver | None = None

    def start(self, incoming: IncomingRequest) -> RequestRecord:
        if self.observer is not None:
            self.observer.started()
        return RequestRecord(incoming)

    def pass_on(self, record: RequestRecord) -> None:
        """The request went to the fallback app: not the proxy's to log or count."""
        if self.observer is not None:
            self.observer.passed_on()

    def session_opened(self, record: RequestRecord) -> None:
        """A WebSocket was accepted: an open session until its record finishes."""
        record.websocket = True
        if self.observer is not None:
            self.observer.session_opened()

    def problem(self, record: RequestRecord, exc: ProxyError) -> None:
        record.status = exc.status
        record.problem = exc.detail
        record.routed = not isinstance(exc, NotProxied)
        record.cause = upstream_cause(exc)
        record.shutdown = record.shutdown or isinstance(exc, ShuttingDown)
        if exc.status >= 500:
            cause = exc.__cause__
            suffix = f" ({type(cause).__name__})" if cause is not None else ""
            error_logger.warning("%s %s -> %d: %s%s", record.method,
                                 record.target.decode("latin-1"), exc.status,
                                 exc.detail, suffix)

    def finish(self, record: RequestRecord) -> None:
        if record.broken:
            error_logger.warning("%s %s: aborted the client connection: %s",
                                 record.method, record.target.decode("latin-1"),
                                 record.broken)
        if self.observer is not None:
            self.observer.finished(record, self.route if record.routed else None)
        if not self.enabled or not access_logger.isEnabledFor(logging.INFO):
            return
        total_ms = (time.perf_counter() - record.started) * 1000
        up = record.upstream_at
        upstream_ms = None if up is None else round((up - record.started) * 1000, 1)
        outcome = record.ending()[0]
        target = record.target.decode("latin-1")
        if self.format == "json":
            now = time.time()
            message = json.dumps({
                "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
                        + f".{int(now % 1 * 1000):03d}Z",
                "method": record.method, "target": target, "status": record.status,
                "bytes_in": record.bytes_in, "bytes_out": record.bytes_out,
                "upstream_ms": upstream_ms, "total_ms": round(total_ms, 1), "outcome": outcome,
                "upstream": (None if not record.routed else self.upstream or None
                             if record.upstream is None else str(record.upstream)),
                "route": self.route if record.routed else None,
            })
        else:  # one preformatted string: no %-args for logging to keep and apply
            message = (f"{record.method} {target} {record.status} in={record.bytes_in} "
                       f"out={record.bytes_out} upstream_ms="
                       f"{'-' if upstream_ms is None else upstream_ms} "
                       f"total_ms={total_ms:.1f} {outcome}")
        access_logger.info(message)
