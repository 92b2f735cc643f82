"""Trace the proxied requests from the Python API: the application sets up the
OpenTelemetry SDK (here, each span printed as one JSON line on stdout; an OTLP
exporter in production) and hands its provider to the proxy.

    DUALPROXY_UPSTREAM=http://127.0.0.1:9000 \\
        uvicorn examples.filters.traced:app --no-proxy-headers
"""

from __future__ import annotations

import os

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

from dualproxy import AsyncProxy

UPSTREAM = os.environ.get("DUALPROXY_UPSTREAM", "http://127.0.0.1:9000")


def one_line(span: ReadableSpan) -> str:
    return span.to_json(indent=None) + "\n"


provider = TracerProvider(resource=Resource.create({"service.name": "traced-example"}))
provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(formatter=one_line)))

# A SERVER span per request, a CLIENT span per upstream try, `traceparent` sent upstream.
app = AsyncProxy(UPSTREAM, mount="/api", tracing=True, tracer_provider=provider)
