"""OpenTelemetry tracing: a built-in filter (issue 21), the same on both faces.

Per proxied request (the stable HTTP semantic conventions):

- one SERVER span, `{method} {route}` (`http.route` is the route's mount, never
  the raw path), from the filters' first look at the request to the exchange's
  end (its body relayed; for a WebSocket, the session's end);
- one CLIENT span per try of the upstream (`on_attempt`), a child of the SERVER
  span, with `http.request.resend_count` on retries; it ends with its failure,
  or when the answer is over (a WebSocket handshake's: at its answer);
- the cache's and the rate limit's decisions as attributes of the SERVER span;
- W3C Trace Context: a trusted proxy's `traceparent`/`tracestate` are continued
  (`trusted_proxies`, as for the forwarding headers and request ids; never with
  `tracing_new_traces`), anyone else's start a new trace; each try sends its own
  CLIENT span's `traceparent` upstream, in place of any the client sent;
- `trace_id=` on the access-log line;
- a request the core refused before the filters (`on_refusal`: 400, 404, 413 ...)
  is one SERVER span with its status and `error.type`.

This module is imported only when a route has tracing on: a proxy without it
never imports opentelemetry. `dualproxy serve` sets the process's tracer
provider up from the standard OTEL_* variables in each worker (`setup_from_env`).
"""

from __future__ import annotations

import atexit
import multiprocessing.util
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .. import __version__
from ..core import ResponseHead
from ..errors import NotProxied, ProxyError
from ..logs import refusal_outcome
from .base import Attempt, Exchange, Filter

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span

    from ..config import ProxyConfig

SCHEMA_URL = "https://opentelemetry.io/schemas/1.26.0"
TRACEPARENT = b"traceparent"
TRACESTATE = b"tracestate"
_CONTEXT_HEADERS = (TRACEPARENT, TRACESTATE)
# The methods the conventions name; others are `_OTHER` (their own name in
# http.request.method_original), so a client cannot make span names of its choosing.
KNOWN_METHODS = frozenset({"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST",
                           "PUT", "TRACE", "QUERY"})
EXPORTERS = ("otlp", "console", "none")

_SERVER = object()  # exchange.state keys: the SERVER span, the open CLIENT span
_CLIENT = object()
_PROPAGATOR = TraceContextTextMapPropagator()


def _method(method: str, attributes: dict[str, Any]) -> str:
    if method in KNOWN_METHODS:
        attributes["http.request.method"] = method
        return method
    attributes["http.request.method"] = "_OTHER"
    attributes["http.request.method_original"] = method
    return "HTTP"


def _error_type(exc: BaseException) -> str:
    kind = type(exc)
    module = kind.__module__
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"


class Tracing(Filter):
    """The SERVER span of each exchange and a CLIENT span per upstream try."""

    name = "tracing"
    _valid_heads = True  # its traceparent is hex, its tracestate the SDK's validated one

    def __init__(self, tracer_provider: Any = None, *,
                 is_trusted: Callable[[str | None], bool] | None = None,
                 new_traces: bool = False, route: str = "/", rate_limited: bool = False,
                 ) -> None:
        provider = tracer_provider if tracer_provider is not None \
            else trace.get_tracer_provider()
        self.tracer = provider.get_tracer("dualproxy", __version__, schema_url=SCHEMA_URL)
        # Whose trace context is continued (None: nobody's, every request starts a trace).
        self.is_trusted = None if new_traces else is_trusted
        self.route = route or "/"
        self.rate_limited = rate_limited

    @classmethod
    def for_config(cls, config: ProxyConfig) -> Tracing:
        return cls(config.tracer_provider,
                   is_trusted=config.is_trusted if config.trusted_proxies else None,
                   new_traces=config.tracing_new_traces, route=config.mount or "/",
                   rate_limited=config.rate_limit is not None)

    # -- the SERVER span -------------------------------------------------------------------

    def parent(self, exchange: Exchange) -> Context:
        """A trusted peer's trace context (an empty one, a new trace, otherwise: the
        context of the code around the proxy is not the client's trace either)."""
        incoming = exchange.incoming
        if self.is_trusted is None or not self.is_trusted(incoming.peer):
            return Context()
        carrier: dict[str, list[str]] = {}
        for name, value in incoming.headers:
            if name in _CONTEXT_HEADERS:
                carrier.setdefault(name.decode("latin-1"), []).append(value.decode("latin-1"))
        if len(carrier.get("traceparent", ())) != 1:  # none, or ambiguous: a new trace
            return Context()
        return _PROPAGATOR.extract(carrier, Context())

    def _start_server(self, exchange: Exchange, routed: bool = True,
                      attributes: dict[str, Any] | None = None,
                      start_time: int | None = None) -> Span:
        """The SERVER span of `exchange` (named by its route when `routed`), its trace
        id on the access-log record."""
        incoming = exchange.incoming
        record = exchange.record
        start: dict[str, Any] = {}
        method = _method(incoming.method, start)
        if routed:
            start["http.route"] = self.route
        start["url.path"] = incoming.target.split(b"?", 1)[0].decode("latin-1")
        start["url.scheme"] = incoming.scheme
        if record.client is not None:
            start["client.address"] = record.client
        if attributes:
            start.update(attributes)
        span = self.tracer.start_span(f"{method} {self.route}" if routed else method,
                                      self.parent(exchange), SpanKind.SERVER, start,
                                      start_time=start_time)
        trace_id = span.get_span_context().trace_id
        if trace_id:  # 0: no SDK behind the API (a no-op provider), no trace to name
            record.trace_id = f"{trace_id:032x}"
        return span

    def on_request(self, exchange: Exchange) -> None:
        exchange.state[_SERVER] = self._start_server(exchange)

    def on_refusal(self, exchange: Exchange, error: ProxyError) -> None:
        """A request the core refused before the filters (a bad target, outside the
        mount, too large): a SERVER span from the request's arrival to the refusal,
        with its status and `error.type` (the status); outside the mount it has no
        route (`http.route`, the name's), as the metrics' route label."""
        status = error.status
        attributes: dict[str, Any] = {"http.response.status_code": status,
                                      "dualproxy.outcome": refusal_outcome(status)}
        if status >= 400:
            attributes["error.type"] = str(status)
        # The request's arrival (the record's perf_counter clock) on the span's clock.
        started = time.time_ns() - int((time.perf_counter() - exchange.record.started) * 1e9)
        span = self._start_server(exchange, not isinstance(error, NotProxied), attributes,
                                  started)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR, error.detail))
        span.end()

    def on_response(self, exchange: Exchange, head: ResponseHead) -> None:
        client = exchange.state.get(_CLIENT)
        if client is not None:
            status = exchange.record.status  # the upstream's (face.response_head)
            client.set_attribute("http.response.status_code", status)
            if status >= 400:  # a client span's error (the conventions: 4xx too)
                client.set_attribute("error.type", str(status))
                client.set_status(Status(StatusCode.ERROR))
            if head.status == 101:  # a WebSocket handshake: the try is over
                del exchange.state[_CLIENT]
                client.end()

    def on_end(self, exchange: Exchange) -> None:
        state = exchange.state
        record = exchange.record
        client = state.pop(_CLIENT, None)
        if client is not None:
            # The upstream failed mid-body, or its head was refused (502, invalid).
            failure = record.broken or (record.problem if record.status >= 500 else None)
            if failure:
                client.set_attribute("error.type", record.cause or str(record.status))
                client.set_status(Status(StatusCode.ERROR, failure))
            client.end()
        span: Span | None = state.pop(_SERVER, None)
        if span is None:
            return
        if span.is_recording():
            status = record.status
            attributes: dict[str, Any] = {}
            if status:
                attributes["http.response.status_code"] = status
            outcome = record.ending()[0]
            if outcome != "ok":
                attributes["dualproxy.outcome"] = outcome
            if status >= 500 or record.broken or record.shutdown:
                attributes["error.type"] = record.cause or (
                    str(status) if status >= 500 else outcome)
                span.set_status(Status(StatusCode.ERROR, record.problem or record.broken))
            if record.cache is not None:
                attributes["dualproxy.cache"] = record.cache
            if self.rate_limited:
                attributes["dualproxy.rate_limit"] = (
                    "limited" if outcome == "rate-limited"
                    else "skipped" if record.limit_skipped else "passed")
            if record.request_id is not None:
                attributes["dualproxy.request_id"] = record.request_id
            span.set_attributes(attributes)
        span.end()

    # -- a CLIENT span per try ---------------------------------------------------------------

    def on_attempt(self, exchange: Exchange, attempt: Attempt) -> None:
        server = exchange.state.get(_SERVER)
        plan = exchange.plan
        if server is None or plan is None:
            return
        upstream = attempt.upstream
        attributes: dict[str, Any] = {}
        method = _method(plan.method, attributes)
        attributes["server.address"] = upstream.socket_path or upstream.host
        if upstream.port:
            attributes["server.port"] = upstream.port
        attributes["url.full"] = upstream.origin + plan.target.decode("latin-1")
        if attempt.number:
            attributes["http.request.resend_count"] = attempt.number
        client = self.tracer.start_span(method, trace.set_span_in_context(server, Context()),
                                        SpanKind.CLIENT, attributes)
        exchange.state[_CLIENT] = client
        # The W3C header written here (what the propagator's inject writes, without
        # its context lookups: this runs on every try).
        context = client.get_span_context()
        headers = [(n, v) for n, v in plan.headers if n not in _CONTEXT_HEADERS]
        if context.is_valid:  # not with the API's no-op provider (OTEL_SDK_DISABLED ...)
            headers.append((TRACEPARENT, b"00-%032x-%016x-%02x" % (
                context.trace_id, context.span_id, context.trace_flags)))
            if context.trace_state:
                headers.append((TRACESTATE, context.trace_state.to_header().encode("latin-1")))
        plan.headers[:] = headers

    def on_attempt_end(self, exchange: Exchange, attempt: Attempt) -> None:
        error = attempt.error
        if error is None:  # the head came: the span goes on while the answer does
            return
        client = exchange.state.pop(_CLIENT, None)
        if client is not None:
            client.set_attribute("error.type", _error_type(error))
            client.set_status(Status(StatusCode.ERROR, str(error) or None))
            client.end()


# -- the process's provider under `dualproxy serve` ---------------------------------------------

def exporter_names() -> list[str]:
    """OTEL_TRACES_EXPORTER's names (default otlp), ValueError for one we do not make."""
    names = [name.strip().lower() for name in
             os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if name.strip()]
    unknown = [name for name in names if name not in EXPORTERS]
    if unknown:
        raise ValueError(f"OTEL_TRACES_EXPORTER={','.join(unknown)} is not one of "
                         f"{', '.join(EXPORTERS)}")
    return names


def check_setup() -> None:
    """What `dualproxy serve --tracing` needs, checked before any server starts
    (ValueError, said as a usage error): the SDK and a known exporter."""
    import importlib.util

    if importlib.util.find_spec("opentelemetry.sdk") is None:
        raise ValueError("--tracing needs the OpenTelemetry SDK: pip install "
                         "'dualproxy[tracing]'")
    if "otlp" in exporter_names() and importlib.util.find_spec(
            "opentelemetry.exporter.otlp.proto.http") is None:
        raise ValueError("OTEL_TRACES_EXPORTER=otlp needs opentelemetry-exporter-otlp-proto-"
                         "http: pip install 'dualproxy[tracing]'")


def one_line(span: Any) -> str:
    """A span as one JSON line (the SDK's console format, without its indentation)."""
    return f"{span.to_json(indent=None)}\n"


def setup_from_env() -> TracerProvider:
    """The process's tracer provider from the OTEL_* variables (one a worker process,
    after the fork), made global and shut down (its spans flushed) when the
    process exits: OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES (service.name
    `dualproxy` unless they name one), OTEL_TRACES_SAMPLER(_ARG) (the SDK's own),
    OTEL_TRACES_EXPORTER: otlp (OTLP over HTTP, batched, OTEL_EXPORTER_OTLP_*),
    console (one JSON line a span on stdout, as each ends) or none."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )

    named = "OTEL_SERVICE_NAME" in os.environ or "service.name=" in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", "")
    resource = Resource.create({} if named else {"service.name": "dualproxy"})
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    for name in exporter_names():
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        elif name == "console":
            provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(
                formatter=one_line)))
    trace.set_tracer_provider(provider)
    _shutdown_at_exit(provider)
    return provider


def _shutdown_at_exit(provider: TracerProvider) -> None:
    """Flush and stop `provider` once when the process ends: at interpreter exit (uvicorn,
    gunicorn's workers), or as a multiprocessing child ends (granian's workers leave
    through os._exit, past atexit)."""
    lock = threading.Lock()
    done = False

    def shutdown() -> None:
        nonlocal done
        with lock:
            if done:
                return
            done = True
        provider.shutdown()

    atexit.register(shutdown)
    multiprocessing.util.Finalize(provider, shutdown, exitpriority=10)
