"""OpenTelemetry tracing (`--tracing`, filters/tracing.py) on every pairing.

The proxies run with OTEL_TRACES_EXPORTER=console: each span is one JSON line on
the proxy's output (the SDK's own format), read back here; the recording upstream
shows the `traceparent` each try sent. The in-process tests at the end give the
Python API an SDK provider with an InMemorySpanExporter.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, MakeProxy, ProxyProcess, free_port
from tests.upstream import Upstream

TRUST = ("--trusted-proxy", "127.0.0.1/32")
THEIR_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
THEIR_SPAN = "00f067aa0ba902b7"
THEIR_PARENT = f"00-{THEIR_TRACE}-{THEIR_SPAN}-01"


@pytest.fixture(autouse=True)
def console_exporter(monkeypatch: pytest.MonkeyPatch) -> None:
    """The proxies this module starts print their spans (the env they inherit)."""
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "dualproxy-test")
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)


def hex_id(value: str | None) -> str | None:
    return None if value is None else value.removeprefix("0x")


def all_spans(proxy: ProxyProcess) -> list[dict[str, Any]]:
    spans = []
    # The last line may be a span still being written: only whole lines are read.
    for line in proxy.log().split("\n")[:-1]:
        if line.startswith('{"name": '):
            spans.append(json.loads(line))
    return spans


def spans_of(proxy: ProxyProcess, rid: str, count: int, timeout: float = 10.0
             ) -> list[dict[str, Any]]:
    """The spans of the request whose path holds `rid` (and of its trace), once `count`
    are written (a span is written as it ends: the server's after the answer)."""
    deadline = time.monotonic() + timeout
    while True:
        spans = all_spans(proxy)
        traces = {span["context"]["trace_id"] for span in spans
                  if rid in span["attributes"].get("url.path", "")
                  or rid in span["attributes"].get("url.full", "")}
        mine = [span for span in spans if span["context"]["trace_id"] in traces]
        if len(mine) >= count or time.monotonic() > deadline:
            assert len(mine) == count, (mine, proxy.log()[-3000:])
            return mine


def by_kind(spans: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return sorted((span for span in spans if span["kind"] == f"SpanKind.{kind}"),
                  key=lambda span: span["start_time"])


def ids(span: dict[str, Any]) -> tuple[str, str]:
    context = span["context"]
    return hex_id(context["trace_id"]) or "", hex_id(context["span_id"]) or ""


def parse_parent(header: str) -> tuple[str, str]:
    """A traceparent's trace and parent ids (checked: version 00, sampled)."""
    version, trace_id, parent_id, flags = header.split("-")
    assert version == "00"
    assert int(flags, 16) & 1  # sampled (the SDK sets the random-trace-id bit too)
    return trace_id, parent_id


def access_line(proxy: ProxyProcess, rid: str, path: str | None = None) -> str:
    """The access line of the request to `path` (default: /t/{rid})."""
    needle = f"/t/{rid}" if path is None else path
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = [line for line in proxy.log().splitlines()
                 if needle in line and "dualproxy.access" in line]
        if lines:
            return lines[0]
        time.sleep(0.05)
    raise AssertionError(f"no access line for {rid}:\n{proxy.log()[-3000:]}")


# --- the spans of one request, and what the upstream received --------------------------

def test_server_and_client_spans(make_proxy: MakeProxy, upstream: Upstream, rid: str) -> None:
    proxy = make_proxy("--tracing", "--mount", "/t")
    with proxy.client() as client:
        response = client.get(f"/t/{rid}?q=1", headers={"x-req-id": rid})
    assert response.status_code == 200
    spans = spans_of(proxy, rid, 2)
    [server], [client_span] = by_kind(spans, "SERVER"), by_kind(spans, "CLIENT")
    trace_id, server_id = ids(server)
    assert server["name"] == "GET /t"
    assert server["parent_id"] is None
    attributes = server["attributes"]
    assert attributes["http.route"] == "/t"
    assert attributes["http.request.method"] == "GET"
    assert attributes["url.path"] == f"/t/{rid}"
    assert attributes["url.scheme"] == "http"
    assert attributes["client.address"] == "127.0.0.1"
    assert attributes["http.response.status_code"] == 200
    assert "error.type" not in attributes
    assert server["resource"]["attributes"]["service.name"] == "dualproxy-test"
    # The CLIENT span: a child of the SERVER span, in the same trace.
    assert client_span["name"] == "GET"
    assert ids(client_span)[0] == trace_id
    assert hex_id(client_span["parent_id"]) == server_id
    host, port = upstream.url.removeprefix("http://").split(":")
    attributes = client_span["attributes"]
    assert attributes["server.address"] == host
    assert attributes["server.port"] == int(port)
    assert attributes["url.full"] == f"{upstream.url}/{rid}?q=1"
    assert attributes["http.response.status_code"] == 200
    assert "http.request.resend_count" not in attributes
    # The upstream joins the trace: the CLIENT span is its parent.
    sent = upstream.wait_record(rid).header_all("traceparent")
    assert len(sent) == 1
    assert parse_parent(sent[0]) == (trace_id, ids(client_span)[1])
    # The access line names the trace.
    assert f" trace_id={trace_id}" in access_line(proxy, rid)


def traced_get(proxy: ProxyProcess, upstream: Upstream, rid: str
               ) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """GET with someone's trace context: the SERVER and CLIENT spans, the upstream's record."""
    with proxy.client() as client:
        response = client.get(f"/t/{rid}", headers={
            "x-req-id": rid, "traceparent": THEIR_PARENT, "tracestate": "vendor=abc"})
    assert response.status_code == 200
    spans = spans_of(proxy, rid, 2)
    [server], [client_span] = by_kind(spans, "SERVER"), by_kind(spans, "CLIENT")
    return server, client_span, upstream.wait_record(rid)


def test_a_trusted_proxys_traceparent_is_continued(make_proxy: MakeProxy, upstream: Upstream,
                                                   rid: str) -> None:
    proxy = make_proxy("--tracing", "--mount", "/t", *TRUST)
    server, client_span, record = traced_get(proxy, upstream, rid)
    assert ids(server)[0] == THEIR_TRACE
    assert hex_id(server["parent_id"]) == THEIR_SPAN
    [sent] = record.header_all("traceparent")
    assert parse_parent(sent) == (THEIR_TRACE, ids(client_span)[1])
    assert record.header_all("tracestate") == ["vendor=abc"]


@pytest.mark.parametrize("flags", [(), (*TRUST, "--tracing-new-traces")],
                         ids=["untrusted", "new-traces"])
def test_other_traceparents_start_a_new_trace(make_proxy: MakeProxy, upstream: Upstream,
                                              rid: str, flags: tuple[str, ...]) -> None:
    """An untrusted client's trace context (or any, with --tracing-new-traces) is not
    continued, and not forwarded as it came: the upstream gets the new trace's."""
    proxy = make_proxy("--tracing", "--mount", "/t", *flags)
    server, client_span, record = traced_get(proxy, upstream, rid)
    trace_id = ids(server)[0]
    assert trace_id != THEIR_TRACE
    assert server["parent_id"] is None
    [sent] = record.header_all("traceparent")
    assert parse_parent(sent) == (trace_id, ids(client_span)[1])
    assert record.header_all("tracestate") == []


# --- tries and failures ------------------------------------------------------------------

def test_a_retry_is_a_second_client_span(make_proxy: MakeProxy, upstream: Upstream) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    # --max-fails 0: the dead one stays in the rotation, so one of two requests retries.
    proxy = make_proxy("--tracing", "--mount", "/t", "--upstream", upstream.url,
                       "--balance", "round-robin", "--max-fails", "0", upstream_url=dead)
    retried = None
    with proxy.client() as client:
        for i in range(2):
            rid = f"trace-retry-{i}-{time.monotonic_ns()}"
            assert client.get(f"/t/{rid}", headers={"x-req-id": rid}).status_code == 200
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                mine = [s for s in all_spans(proxy)
                        if rid in s["attributes"].get("url.path", "")]
                if mine:
                    break
                time.sleep(0.05)
            trace_id = ids(mine[0])[0]
            clients = by_kind([s for s in all_spans(proxy) if ids(s)[0] == trace_id], "CLIENT")
            if len(clients) == 2:
                retried = (rid, mine[0], clients)
    assert retried is not None, proxy.log()[-3000:]
    rid, server, (first, second) = retried
    assert hex_id(first["parent_id"]) == hex_id(second["parent_id"]) == ids(server)[1]
    assert first["attributes"]["server.port"] != second["attributes"]["server.port"]
    assert first["attributes"]["error.type"] == "httpx.ConnectError"
    assert first["status"]["status_code"] == "ERROR"
    assert "http.request.resend_count" not in first["attributes"]
    assert second["attributes"]["http.request.resend_count"] == 1
    assert second["attributes"]["http.response.status_code"] == 200
    assert "error.type" not in second["attributes"]
    assert server["attributes"]["http.response.status_code"] == 200
    # Each try sent its own span's id: the upstream got the second's.
    [sent] = upstream.wait_record(rid).header_all("traceparent")
    assert parse_parent(sent) == ids(second)


def test_an_unreachable_upstream_is_an_error(make_proxy: MakeProxy, rid: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    proxy = make_proxy("--tracing", "--mount", "/t", "--retries", "0", upstream_url=dead)
    with proxy.client() as client:
        assert client.get(f"/t/{rid}").status_code == 502
    spans = spans_of(proxy, rid, 2)
    [server], [client_span] = by_kind(spans, "SERVER"), by_kind(spans, "CLIENT")
    assert server["attributes"]["http.response.status_code"] == 502
    assert server["attributes"]["error.type"]
    assert server["attributes"]["dualproxy.outcome"] == "failed"
    assert server["status"]["status_code"] == "ERROR"
    assert client_span["attributes"]["error.type"] == "httpx.ConnectError"
    assert client_span["status"]["status_code"] == "ERROR"
    assert f" trace_id={ids(server)[0]}" in access_line(proxy, rid)


def test_an_upstream_5xx_marks_both_spans(make_proxy: MakeProxy, rid: str) -> None:
    proxy = make_proxy("--tracing", "--mount", "/t")
    with proxy.client() as client:
        response = client.get(f"/t/{rid}", headers={"x-upstream": "status code=503"})
    assert response.status_code == 503
    spans = spans_of(proxy, rid, 2)
    [server], [client_span] = by_kind(spans, "SERVER"), by_kind(spans, "CLIENT")
    assert server["attributes"]["error.type"] == "503"
    assert client_span["attributes"]["error.type"] == "503"
    assert client_span["attributes"]["http.response.status_code"] == 503


def test_an_upstream_cut_mid_body_is_an_error_of_both_spans(make_proxy: MakeProxy,
                                                              rid: str) -> None:
    proxy = make_proxy("--tracing", "--mount", "/t")
    with proxy.client() as client, pytest.raises(httpx.HTTPError):
        client.get(f"/t/{rid}", headers={"x-upstream": "cut size=200000 after=1000"})
    spans = spans_of(proxy, rid, 2)
    [server], [client_span] = by_kind(spans, "SERVER"), by_kind(spans, "CLIENT")
    assert server["attributes"]["dualproxy.outcome"] == "upstream-broken"
    assert server["attributes"]["error.type"] == "cut_body"
    assert server["status"]["status_code"] == "ERROR"
    assert client_span["attributes"]["http.response.status_code"] == 200
    assert client_span["attributes"]["error.type"] == "cut_body"
    assert client_span["status"]["status_code"] == "ERROR"


# --- requests the core refuses before the filters -----------------------------------------

@pytest.mark.parametrize(("case", "status"), [("nul", 400), ("outside", 404), ("large", 413)])
def test_a_refusal_before_the_filters_has_a_server_span(make_proxy: MakeProxy,
                                                         upstream: Upstream, rid: str,
                                                         case: str, status: int) -> None:
    """A bad target (an encoded NUL), a path outside the mount and a body declared
    too large are the core's refusals, before any filter: one SERVER span each, with
    the status and error.type, no CLIENT span, nothing upstream, the trace id logged;
    outside the mount the span has no route. A trusted caller's trace is continued."""
    proxy = make_proxy("--tracing", "--mount", "/t", "--max-body-size", "10", *TRUST)
    trace = os.urandom(16).hex()  # a trace of its own (the proxy serves the other cases)
    path = {"nul": f"/t/{rid}%00", "outside": f"/elsewhere/{rid}", "large": f"/t/{rid}"}[case]
    with proxy.client() as client:
        response = client.request("POST" if case == "large" else "GET", path,
                                  content=b"x" * 100 if case == "large" else None,
                                  headers={"traceparent": f"00-{trace}-{THEIR_SPAN}-01",
                                           "x-req-id": rid})
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    [server] = spans_of(proxy, rid, 1)
    assert server["kind"] == "SpanKind.SERVER"
    attributes = server["attributes"]
    method = "POST" if case == "large" else "GET"
    assert server["name"] == (method if case == "outside" else f"{method} /t")
    assert attributes.get("http.route") == (None if case == "outside" else "/t")
    assert attributes["http.request.method"] == method
    assert attributes["url.path"] == path
    assert attributes["url.scheme"] == "http"
    assert attributes["client.address"] == "127.0.0.1"
    assert attributes["http.response.status_code"] == status
    assert attributes["error.type"] == str(status)
    assert attributes["dualproxy.outcome"] == "refused"
    assert server["status"]["status_code"] == "UNSET"  # a 4xx is no server error (semconv)
    assert ids(server)[0] == trace and hex_id(server["parent_id"]) == THEIR_SPAN
    assert server["end_time"] >= server["start_time"]
    assert upstream.find(rid) is None
    assert f" trace_id={trace}" in access_line(proxy, rid, f"{path} {status} ")


def test_a_websocket_handshake_outside_the_mount_has_a_server_span(make_proxy: MakeProxy,
                                                                   rid: str) -> None:
    """The core's refusal of a WebSocket handshake (the same refusal as HTTP's, both
    faces: the WSGI face's handshakes go through its ASGI twin)."""
    from tests.test_websocket import refusal

    proxy = make_proxy("--tracing", "--mount", "/t")
    assert refusal(proxy, f"/elsewhere/{rid}").response.status_code == 404
    [server] = spans_of(proxy, rid, 1)
    assert server["kind"] == "SpanKind.SERVER" and server["name"] == "GET"
    assert server["attributes"]["http.response.status_code"] == 404
    assert server["attributes"]["error.type"] == "404"
    assert "http.route" not in server["attributes"]
    line = access_line(proxy, rid, f"/elsewhere/{rid} 404 ")
    assert f" trace_id={ids(server)[0]}" in line


# --- the cache's and the rate limit's decisions -------------------------------------------

def test_cache_and_rate_limit_decisions(make_proxy: MakeProxy, rid: str) -> None:
    proxy = make_proxy("--tracing", "--mount", "/t", "--cache", "--rate-limit", "2/minute",
                       "--rate-key", "route")
    target = f"/t/{rid}"
    headers = {"x-upstream": "download size=10 cc=max-age=60"}
    with proxy.client() as client:
        statuses = [client.get(target, headers=headers).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    spans = spans_of(proxy, rid, 4)  # a miss (and its client span), a hit, a refusal
    servers = by_kind(spans, "SERVER")
    assert [s["attributes"].get("dualproxy.cache") for s in servers] == ["miss", "hit", None]
    assert [s["attributes"]["dualproxy.rate_limit"] for s in servers] == [
        "passed", "passed", "limited"]
    assert [s["attributes"]["http.response.status_code"] for s in servers] == [200, 200, 429]
    assert servers[2]["attributes"]["dualproxy.outcome"] == "rate-limited"
    assert len(by_kind(spans, "CLIENT")) == 1


# --- WebSocket --------------------------------------------------------------------------

def test_websocket_handshake_and_session(make_proxy: MakeProxy, rid: str) -> None:
    from tests.test_websocket import open_ws
    from tests.ws_upstream import WsUpstream

    ws_upstream = WsUpstream().start()
    try:
        proxy = make_proxy("--tracing", upstream_url=ws_upstream.url)
        with open_ws(proxy, f"/echo/{rid}", rid=rid) as ws:
            ws.send("hello")
            assert ws.recv(timeout=5) == "hello"
            # The handshake's CLIENT span ended at its 101; the SERVER span is still open.
            client_span = spans_of(proxy, rid, 1)[0]
            time.sleep(0.3)
            assert by_kind(spans_of(proxy, rid, 1), "SERVER") == []
        spans = spans_of(proxy, rid, 2)
        [server] = by_kind(spans, "SERVER")
        assert client_span["kind"] == "SpanKind.CLIENT"
        assert client_span["attributes"]["http.response.status_code"] == 101
        assert hex_id(client_span["parent_id"]) == ids(server)[1]
        assert server["name"] == "GET /"
        assert server["attributes"]["http.response.status_code"] == 101
        assert server["end_time"] > client_span["end_time"]
        [sent] = ws_upstream.record(rid).header("traceparent")
        assert parse_parent(sent) == ids(client_span)
    finally:
        ws_upstream.stop()


# --- the command line ---------------------------------------------------------------------

def test_tracing_without_the_extra_is_a_usage_error(upstream: Upstream) -> None:
    """No traceback: one line naming the extra (the SDK hidden from the child)."""
    code = ("import sys; sys.modules['opentelemetry.sdk'] = None; "
            "from dualproxy.cli import main; "
            f"sys.exit(main(['serve', '--upstream', '{upstream.url}', '--tracing']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "dualproxy serve: error: --tracing needs the OpenTelemetry SDK: pip install "
        "'dualproxy[tracing]' (see dualproxy serve --help)"]


def test_an_unknown_exporter_is_a_usage_error(upstream: Upstream) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "dualproxy", "serve", "--upstream", upstream.url, "--tracing"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
        env={**os.environ, "OTEL_TRACES_EXPORTER": "zipkin"})
    assert done.returncode == 2
    assert "OTEL_TRACES_EXPORTER=zipkin is not one of otlp, console, none" in done.stderr
    assert "Traceback" not in done.stderr


# --- the Python API, in process (the core's unit test: httpx's app transports) -----------

@pytest.fixture
def memory() -> Iterator[Any]:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def _check_memory_spans(exporter: Any, upstream: Upstream, rid: str) -> None:
    from opentelemetry.trace import SpanKind

    spans = exporter.get_finished_spans()
    [server] = [s for s in spans if s.kind is SpanKind.SERVER]
    [client] = [s for s in spans if s.kind is SpanKind.CLIENT]
    assert server.name == "POST /api"
    assert server.attributes["http.route"] == "/api"
    assert server.attributes["url.path"] == f"/api/{rid}"
    assert server.attributes["http.response.status_code"] == 200
    assert client.parent is not None and client.parent.span_id == server.context.span_id
    assert client.context.trace_id == server.context.trace_id
    [sent] = upstream.wait_record(rid).header_all("traceparent")
    assert parse_parent(sent) == (f"{client.context.trace_id:032x}",
                                  f"{client.context.span_id:016x}")


def test_python_api_async(memory: Any, upstream: Upstream, rid: str) -> None:
    from dualproxy import AsyncProxy

    provider, exporter = memory
    proxy = AsyncProxy(upstream.url, mount="/api", tracing=True, tracer_provider=provider,
                       access_log=False)

    async def run() -> int:
        transport = httpx.ASGITransport(app=proxy)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            response = await client.post(f"/api/{rid}", content=b"x" * 10,
                                         headers={"x-req-id": rid})
        await proxy.aclose()
        return response.status_code

    assert asyncio.run(run()) == 200
    _check_memory_spans(exporter, upstream, rid)


def test_python_api_sync(memory: Any, upstream: Upstream, rid: str) -> None:
    from dualproxy import SyncProxy

    provider, exporter = memory
    proxy = SyncProxy(upstream.url, mount="/api", tracing=True, tracer_provider=provider,
                      access_log=False)
    transport = httpx.WSGITransport(app=proxy)
    with httpx.Client(transport=transport, base_url="http://app") as client:
        response = client.post(f"/api/{rid}", content=b"x" * 10, headers={"x-req-id": rid})
    assert response.status_code == 200
    proxy.close()
    _check_memory_spans(exporter, upstream, rid)


def test_nothing_is_imported_when_tracing_is_off(upstream: Upstream) -> None:
    code = (
        "import sys, httpx\n"
        "from dualproxy import SyncProxy\n"
        f"proxy = SyncProxy({upstream.url!r}, access_log=False, request_id=True)\n"
        "with httpx.Client(transport=httpx.WSGITransport(app=proxy), base_url='http://a') as c:\n"
        "    assert c.get('/x').status_code == 200\n"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry')], 'imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr


def test_the_sampler_comes_from_the_environment(pairing: str, upstream: Upstream,
                                                monkeypatch: pytest.MonkeyPatch,
                                                rid: str) -> None:
    """OTEL_TRACES_SAMPLER=always_off (the SDK's own reading): no span is recorded, yet
    the trace context still goes upstream (not sampled) and the log names the trace."""
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    proxy = ProxyProcess(pairing, upstream.url, ("--tracing", "--mount", "/t"))
    try:
        with proxy.client() as client:
            assert client.get(f"/t/{rid}", headers={"x-req-id": rid}).status_code == 200
        [sent] = upstream.wait_record(rid).header_all("traceparent")
        version, trace_id, _, flags = sent.split("-")
        assert int(flags, 16) & 1 == 0  # not sampled: the upstream need not record either
        assert f" trace_id={trace_id}" in access_line(proxy, rid)
        assert all_spans(proxy) == []
    finally:
        proxy.stop()


# --- OTLP: batched, flushed when the worker stops ----------------------------------------

class OtlpReceiver:
    """A collector's OTLP/HTTP traces endpoint: records the span names it receives, but
    not the spans of the harness's readiness probe (a request refused with a 404)."""

    def __init__(self) -> None:
        import http.server
        import threading

        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        received = self.spans = []  # type: list[tuple[str, str]]

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                for resource in request.resource_spans:
                    for scope in resource.scope_spans:
                        received.extend(
                            (self.path, span.name) for span in scope.spans
                            if not any(a.key == "url.path"
                                       and "dualproxy-ready" in a.value.string_value
                                       for a in span.attributes))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_otlp_spans_are_flushed_when_the_server_stops(
        pairing: str, upstream: Upstream, monkeypatch: pytest.MonkeyPatch, rid: str) -> None:
    """The batch exporter waits a minute between exports here: the spans reach the
    collector only because each worker shuts its provider down as it exits."""
    receiver = OtlpReceiver()
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "60000")
    try:
        proxy = ProxyProcess(pairing, upstream.url, ("--tracing", "--mount", "/t"))
        try:
            with proxy.client() as client:
                assert client.get(f"/t/{rid}").status_code == 200
            time.sleep(0.5)
            assert receiver.spans == []  # held by the batch processor
        finally:
            proxy.stop()
        assert sorted(receiver.spans) == [("/v1/traces", "GET"), ("/v1/traces", "GET /t")], \
            proxy.log()[-3000:]
    finally:
        receiver.stop()


# --- configuration and the log line -------------------------------------------------------

def test_tracing_keys_in_a_config_file(tmp_path: Any) -> None:
    from dualproxy.cli import check_route, load_config_file
    from dualproxy.filters import build_chain
    from dualproxy.filters.tracing import Tracing

    route = '[[route]]\nmount = "{}"\nupstream = "http://127.0.0.1:9"\n'
    path = tmp_path / "traced.toml"
    path.write_text(route.format("/a") + 'tracing = true\ntracing_new_traces = true\n'
                    'trusted_proxies = ["127.0.0.1/32"]\n' + route.format("/b"))
    argv = ["serve", "--config", str(path)]
    traced, plain = map(check_route, load_config_file(str(path), argv)[1])
    assert (traced.tracing, traced.tracing_new_traces) == (True, True)
    assert (plain.tracing, plain.tracing_new_traces) == (False, False)
    first = build_chain(traced).filters[0]
    assert isinstance(first, Tracing)  # outermost: its span covers the others
    assert first.is_trusted is None  # new traces: nobody's context is continued
    assert not any(isinstance(f, Tracing) for f in build_chain(plain).filters)


def test_the_access_line_names_the_trace() -> None:
    from dualproxy.core import IncomingRequest
    from dualproxy.logs import AccessLog

    record = AccessLog().start(IncomingRequest("GET", b"/x", [], "127.0.0.1"), "127.0.0.1")
    record.status = 200
    assert "trace_id" not in AccessLog().message(record, time.time(), time.perf_counter())
    record.trace_id = THEIR_TRACE
    text = AccessLog().message(record, time.time(), time.perf_counter())
    assert text.endswith(f" ok trace_id={THEIR_TRACE}")
    line = json.loads(AccessLog(format="json").message(record, time.time(),
                                                       time.perf_counter()))
    assert line["trace_id"] == THEIR_TRACE
    assert line["outcome"] == "ok"


def test_without_an_sdk_no_context_goes_upstream(upstream: Upstream, rid: str) -> None:
    """The API's no-op provider (no SDK set up, or OTEL_SDK_DISABLED): no span, no trace
    id, and no traceparent upstream, the client's included."""
    from opentelemetry.trace import NoOpTracerProvider

    from dualproxy import SyncProxy

    proxy = SyncProxy(upstream.url, tracing=True, tracer_provider=NoOpTracerProvider(),
                      access_log=False)
    with httpx.Client(transport=httpx.WSGITransport(app=proxy), base_url="http://a") as client:
        response = client.get(f"/{rid}", headers={"x-req-id": rid, "traceparent": THEIR_PARENT})
    assert response.status_code == 200
    proxy.close()
    assert upstream.wait_record(rid).header_all("traceparent") == []
