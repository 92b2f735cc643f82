"""One access-log line per proxied request, through the standard `logging` module.

Logger `dualproxy.access` gets the line at INFO; expected failures (a refused
upstream, a vanished client) are logged once on `dualproxy` with their cause,
never as tracebacks. Both faces feed the same `RequestRecord`, so the lines
read the same whatever the face. The `json` format makes the message one JSON
object (`dualproxy serve` then writes it alone on its line). An optional
`RequestObserver` (the Prometheus metrics, metrics.py) sees the same records.

Under `dualproxy serve` the access logger's only handler is an `AccessLineHandler`:
`AccessLog.finish` then writes the finished line itself, skipping the LogRecord,
the handler chain and the formatter, which cost more than the rest of a small
request's logging together.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from json.encoder import encode_basestring_ascii as _json_str  # what json.dumps uses
from typing import Any, Protocol, TextIO

from .core import IncomingRequest
from .errors import NotProxied, ProxyError, ShuttingDown, describe, upstream_cause
from .upstreams import Upstream

FORMATS = ("text", "json")

LINE_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"

access_logger = logging.getLogger("dualproxy.access")
error_logger = logging.getLogger("dualproxy")


class _PerSecond:
    """`time.strftime` of a whole second, made once a second. The (second, text)
    pair is replaced as one, so threads share it without a lock."""

    def __init__(self, fmt: str, convert: Callable[[float], time.struct_time]) -> None:
        self.fmt = fmt
        self.convert = convert
        self.cached: tuple[int, str] = (-1, "")

    def __call__(self, second: int) -> str:
        cached = self.cached
        if cached[0] != second:
            cached = self.cached = (second, time.strftime(self.fmt, self.convert(second)))
        return cached[1]


def _pid_prefix() -> str:
    return f"INFO [{os.getpid()}] {access_logger.name}: "


_prefix = _pid_prefix()  # getpid is a system call: made once, and again in a forked child


def _forked() -> None:
    global _prefix
    _prefix = _pid_prefix()


os.register_at_fork(after_in_child=_forked)

_local_second = _PerSecond("%Y-%m-%d %H:%M:%S", time.localtime)
_utc_second = _PerSecond("%Y-%m-%dT%H:%M:%S", time.gmtime)


class LineFormatter(logging.Formatter):
    """The stock formatter, with the date part of `asctime` made once a second."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return f"{_local_second(int(record.created))},{int(record.msecs):03d}"


class AccessLineHandler(logging.Handler):
    """`dualproxy serve`'s handler for access lines, on a stream (stderr).

    Each line is one `os.write` to the stream's descriptor, unbuffered: lines stay
    whole under threads and worker processes sharing it (atomic for pipes up to
    PIPE_BUF, and for files opened for append), and none is lost at exit or in a
    crash. A stream without a descriptor gets a write and a flush under the lock.
    `prefixed`: text lines carry `LINE_FORMAT`'s prefix; json objects stand alone.
    """

    def __init__(self, stream: TextIO, *, prefixed: bool) -> None:
        super().__init__()
        self.stream = stream
        try:
            self.fd: int | None = stream.fileno()
        except (AttributeError, OSError, ValueError):
            self.fd = None
        self.encoding = getattr(stream, "encoding", None) or "utf-8"
        self.errors = getattr(stream, "errors", None) or "backslashreplace"
        self.prefixed = prefixed
        self.setFormatter(LineFormatter(LINE_FORMAT) if prefixed else
                          logging.Formatter("%(message)s"))

    def line(self, message: str, now: float) -> str:
        """The line `LINE_FORMAT` makes of an INFO record created at `now`."""
        if not self.prefixed:
            return message
        second = int(now)
        return f"{_local_second(second)},{int((now - second) * 1000):03d} {_prefix}{message}"

    def write(self, line: str) -> None:
        if self.fd is None:
            with self.lock:  # type: ignore[union-attr]  # created by Handler.__init__
                self.stream.write(line + "\n")
                self.stream.flush()
            return
        data = (line + "\n").encode(self.encoding, self.errors)
        try:
            while data:  # a blocking descriptor writes it all at once; a signal may split it
                data = data[os.write(self.fd, data):]
        except OSError:
            pass  # stderr is gone: there is nowhere left to say so

    def emit(self, record: logging.LogRecord) -> None:
        self.write(self.format(record))


def _direct_handler() -> AccessLineHandler | None:
    """The access logger's handler when it is dualproxy's own, alone, unfiltered."""
    handlers = access_logger.handlers
    if len(handlers) == 1 and not access_logger.propagate and not access_logger.filters:
        handler = handlers[0]
        if (isinstance(handler, AccessLineHandler) and not handler.filters
                and handler.level <= logging.INFO):
            return handler
    return None


# What a text line never carries raw: C0 controls, DEL and every byte past ASCII (a
# terminal reads some as escapes: ESC, the C1 CSI), the backslash that introduces our
# escapes, and the space that separates the fields.
_UNSAFE = re.compile(r"[^\x21-\x5b\x5d-\x7e]")


def _escape_char(match: re.Match[str]) -> str:
    code = ord(match[0])
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def escape_text(text: str) -> str:
    """`text` with every byte a text log line must not carry raw written `\\xNN`.

    A request target (latin-1 text of its bytes) or a forwarded client address
    could otherwise move the cursor, recolour or forge lines on a terminal, or
    add fields to the line.
    """
    return _UNSAFE.sub(_escape_char, text)


class RequestRecord:
    """What one request did: sizes each way, status, timings, how it ended."""

    __slots__ = ("method", "target", "client", "started", "upstream_at", "status",
                 "bytes_in", "bytes_out", "client_gone", "broken", "responded", "problem",
                 "shutdown", "routed", "upstream", "cause", "websocket", "exchange",
                 "request_id", "outcome", "limit_skipped", "cache", "cache_stored",
                 "cache_store_failed", "trace_id")

    def __init__(self, incoming: IncomingRequest, client: str | None = None) -> None:
        self.method = incoming.method
        self.target = incoming.target
        self.client = client  # the client's address, after trusted proxies
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
        self.exchange: Any = None  # the filters' Exchange, whose on_end is still to run
        self.request_id: str | None = None  # X-Request-ID (filters/request_id.py), if on
        # A filter's own word for how its answer ended the request, in place of `ok`
        # (the rate limit's refusal: `rate-limited`).
        self.outcome: str | None = None
        self.limit_skipped = False  # the rate limit's store failed: the request passed unchecked
        # The HTTP cache's part (filters/cache/): hit, miss, stale, revalidated, bypass,
        # collapsed, purge; None: no cache on the route. Bytes it stored from this answer.
        self.cache: str | None = None
        self.cache_stored = 0
        self.cache_store_failed = False  # its store failed (or stood aside): uncached
        self.trace_id: str | None = None  # the request's trace (filters/tracing.py), if on

    def upstream_status(self, status: int) -> None:
        self.upstream_at = time.perf_counter()
        self.status = status

    def closed(self, has_body: bool) -> None:
        """The server closed the response: one it closed with body still to send
        (not broken by the upstream) was left by its client."""
        if has_body and not self.responded and not self.broken:
            self.client_gone = True

    def upstream_broke(self, exc: BaseException) -> None:
        """The upstream failed after the head was sent: the client connection is aborted."""
        self.broken = describe(exc)
        self.cause = upstream_cause(exc)

    def ending(self) -> tuple[str, str | None]:
        """How the request ended: the access log's outcome and the metrics' upstream
        error cause (None: the upstream did not fail).

        `refused`: the proxy answered 4xx itself (bad request, too large, outside
        the mount, a hook's refusal); `failed`: it answered 5xx itself (the upstream
        refused, timed out, no connection came free); `client-gone`: the client left
        before the answer was complete, no status counted as sent; a filter's own
        outcome for its answer (`rate-limited`: the rate limit's 429).
        """
        if self.shutdown:
            return "shutdown-cut", "other"
        if self.client_gone:
            return "client-gone", None
        if self.outcome is not None:
            return self.outcome, None
        if self.problem is not None:
            return refusal_outcome(self.status), self.cause
        return ("upstream-broken" if self.broken else "ok"), self.cause

    def target_text(self) -> str:
        """The target for a log line, escaped (`escape_text`)."""
        return escape_text(self.target.decode("latin-1"))


def refusal_outcome(status: int) -> str:
    """The outcome of an answer the proxy made itself: `refused` (4xx, or the mount's
    redirect) or `failed` (5xx)."""
    return "refused" if status < 500 else "failed"


class RequestObserver(Protocol):
    """What sees every record besides the log line (metrics.ProxyMetrics)."""

    def started(self) -> None: ...

    def passed_on(self) -> None: ...

    def session_opened(self) -> None: ...

    def finished(self, record: RequestRecord, route: str | None) -> None: ...


_JSON_RID = '"request_id": '
_JSON_TID = ', "trace_id": "'
_JSON_NOWHERE = '"upstream": null, "route": null'


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
        self._json_route = _json_str(route)

    def start(self, incoming: IncomingRequest, client: str | None = None) -> RequestRecord:
        if self.observer is not None:
            self.observer.started()
        return RequestRecord(incoming, client)

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
            # The cause in full (the resolver's "Name or service not known", the errno):
            # the client's problem body says less, on purpose.
            cause = exc.__cause__
            suffix = f" ({describe(cause)})" if cause is not None else ""
            error_logger.warning("%s %s -> %d: %s%s", record.method, record.target_text(),
                                 exc.status, exc.log_detail or exc.detail, suffix)

    def finish(self, record: RequestRecord) -> None:
        if record.broken:
            error_logger.warning("%s %s: aborted the client connection: %s",
                                 record.method, record.target_text(), record.broken)
        if self.observer is not None:
            self.observer.finished(record, self.route if record.routed else None)
        if not self.enabled or not access_logger.isEnabledFor(logging.INFO):
            return
        now = time.time()
        message = self.message(record, now, time.perf_counter())
        handler = _direct_handler()
        if handler is None:
            access_logger.info(message)
        else:
            handler.write(handler.line(message, now))

    def _json_where(self, record: RequestRecord) -> str:
        """The json `upstream` (the chosen one, else the configured one; null for a pool
        before a choice) and `route`, both null outside the mount."""
        if not record.routed:
            return _JSON_NOWHERE
        chosen = self.upstream or None if record.upstream is None else str(record.upstream)
        return (f'"upstream": {"null" if chosen is None else _json_str(chosen)}, '
                f'"route": {self._json_route}')

    def message(self, record: RequestRecord, now: float, end: float) -> str:
        """The access line's message for a request that ended at `now` (epoch) and
        `end` (perf_counter)."""
        total_ms = (end - record.started) * 1000
        up = record.upstream_at
        upstream_ms = None if up is None else round((up - record.started) * 1000, 1)
        outcome = record.ending()[0]
        client = record.client
        rid = record.request_id  # only with request ids on: the line is as before otherwise
        tid = record.trace_id  # only with tracing on (32 hex digits: nothing to escape)
        if self.format == "json":  # json.dumps's output for the same dict, made by hand
            second = int(now)
            cache = "" if record.cache is None else f'"cache": "{record.cache}", '
            return (
                f'{{"time": "{_utc_second(second)}.{int((now - second) * 1000):03d}Z", '
                f'"method": {_json_str(record.method)}, '
                f'"target": {_json_str(record.target.decode("latin-1"))}, '
                f'"client": {"null" if client is None else _json_str(client)}, '
                f'"status": {record.status}, "bytes_in": {record.bytes_in}, '
                f'"bytes_out": {record.bytes_out}, "upstream_ms": '
                f'{"null" if upstream_ms is None else repr(upstream_ms)}, '
                f'"total_ms": {round(total_ms, 1)!r}, "outcome": "{outcome}", '
                f'{cache}'
                f'{self._json_where(record)}'
                f'{"" if rid is None else ", " + _JSON_RID + _json_str(rid)}'
                f'{"" if tid is None else _JSON_TID + tid + chr(34)}}}')
        # one preformatted string: no %-args for logging to keep and apply
        return (f"{escape_text(record.method)} {record.target_text()} {record.status} "
                f"in={record.bytes_in} out={record.bytes_out} "
                f"upstream_ms={'-' if upstream_ms is None else upstream_ms} "
                f"total_ms={total_ms:.1f} "
                f"client={'-' if client is None else escape_text(client)} {outcome}"
                f"{'' if rid is None else ' request_id=' + escape_text(rid)}"
                f"{'' if record.cache is None else ' cache=' + record.cache}"
                f"{'' if tid is None else ' trace_id=' + tid}")
