"""One access-log line per proxied request, through the standard `logging` module.

Logger `dualproxy.access` gets the line at INFO; expected failures (a refused
upstream, a vanished client) are logged once on `dualproxy` with their cause,
never as tracebacks. Both faces feed the same `RequestRecord`, so the lines
read the same whatever the face.
"""

from __future__ import annotations

import logging
import time

from .core import IncomingRequest
from .errors import ProxyError

access_logger = logging.getLogger("dualproxy.access")
error_logger = logging.getLogger("dualproxy")


class RequestRecord:
    """What one request did: sizes each way, status, timings, how it ended."""

    __slots__ = ("method", "target", "started", "upstream_at", "status", "bytes_in",
                 "bytes_out", "client_gone", "broken", "responded", "problem", "shutdown")

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

    def upstream_status(self, status: int) -> None:
        self.upstream_at = time.perf_counter()
        self.status = status


class AccessLog:
    """Creates records and writes their lines; `enabled=False` keeps only error lines."""

    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled

    def start(self, incoming: IncomingRequest) -> RequestRecord:
        return RequestRecord(incoming)

    def problem(self, record: RequestRecord, exc: ProxyError) -> None:
        record.status = exc.status
        record.problem = exc.detail
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
        if not self.enabled or not access_logger.isEnabledFor(logging.INFO):
            return
        now = time.perf_counter()
        upstream_ms = (
            f"{(record.upstream_at - record.started) * 1000:.1f}"
            if record.upstream_at is not None else "-"
        )
        outcome = ("shutdown-cut" if record.shutdown
                   else "client-gone" if record.client_gone
                   else "upstream-broken" if record.broken else "ok")
        access_logger.info(
            "%s %s %d in=%d out=%d upstream_ms=%s total_ms=%.1f %s",
            record.method, record.target.decode("latin-1"), record.status,
            record.bytes_in, record.bytes_out, upstream_ms,
            (now - record.started) * 1000, outcome,
        )
