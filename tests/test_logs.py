"""Access lines: json lines with the right values and whole text lines (every pairing);
the hand-made lines equal what `json.dumps` and `logging` made before (unit tests)."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from dualproxy.core import IncomingRequest
from dualproxy.logs import LINE_FORMAT, AccessLineHandler, AccessLog, RequestRecord, access_logger
from dualproxy.upstreams import parse_upstream
from dualproxy.wsgi import SyncProxy
from tests.conftest import MakeProxy, free_port
from tests.rawhttp import Reader, connect, exchange, request_bytes, wait_until
from tests.upstream import Upstream


def _lines(log: str, rid: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.splitlines()
            if line.startswith("{") and rid in line]


def test_json_lines_carry_the_values(make_proxy: MakeProxy, rid: str) -> None:
    proxy = make_proxy("--access-log-format", "json", "--mount", "/api")
    up = httpx.post(proxy.url + f"/api/up/{rid}", content=b"x" * 1234,
                    headers={"x-upstream": "download size=4321"})
    assert up.status_code == 200
    assert httpx.get(proxy.url + f"/elsewhere/{rid}").status_code == 404
    assert wait_until(lambda: len(_lines(proxy.log(), rid)) == 2), proxy.log()
    ok, outside = _lines(proxy.log(), rid)
    assert ok["method"] == "POST" and ok["target"] == f"/api/up/{rid}"
    assert (ok["status"], ok["bytes_in"], ok["bytes_out"], ok["outcome"]) == (
        200, 1234, 4321, "ok")
    assert isinstance(ok["upstream_ms"], float) and isinstance(ok["total_ms"], float)
    assert ok["route"] == "/api" and str(ok["upstream"]).startswith("http://127.0.0.1:")
    assert str(ok["time"]).endswith("Z")
    assert ok["client"] == "127.0.0.1"
    assert (outside["status"], outside["route"], outside["upstream"]) == (404, None, None)
    assert outside["outcome"] == "refused"

    dead = make_proxy("--access-log-format", "json",
                      upstream_url=f"http://127.0.0.1:{free_port()}")
    assert httpx.get(dead.url + f"/gone/{rid}").status_code == 502
    assert wait_until(lambda: len(_lines(dead.log(), rid)) == 1), dead.log()
    [line] = _lines(dead.log(), rid)
    assert (line["status"], line["upstream_ms"], line["route"]) == (502, None, "/")
    assert line["outcome"] == "failed"


def test_own_answers_have_their_outcome(make_proxy: MakeProxy, rid: str) -> None:
    """The proxy's own answers are not `ok`: 4xx `refused`, 5xx `failed`."""
    proxy = make_proxy("--access-log-format", "json", "--mount", "/api",
                       "--max-body-size", "10", "--timeout", "1")
    sent = {
        400: lambda: exchange(proxy.port, request_bytes("GET", f"/api/%00/{rid}")),
        404: lambda: exchange(proxy.port, request_bytes("GET", f"/nope/{rid}")),
        413: lambda: exchange(proxy.port, request_bytes("POST", f"/api/big/{rid}",
                                                        body=b"x" * 11)),
        504: lambda: exchange(proxy.port, request_bytes("GET", f"/api/hang/{rid}", [
            ("x-upstream", "hang seconds=30")])),
    }
    for status, send in sent.items():
        assert send().status == status
    assert wait_until(lambda: len(_lines(proxy.log(), rid)) == 4), proxy.log()
    got = {line["status"]: line["outcome"] for line in _lines(proxy.log(), rid)}
    assert got == {400: "refused", 404: "refused", 413: "refused", 504: "failed"}


def test_client_address_after_trusted_proxies(make_proxy: MakeProxy, rid: str) -> None:
    """`client` is the peer, or behind a trusted proxy the X-Forwarded-For hop it vouches
    for; a text line escapes whatever that hop holds, spaces included."""
    plain = make_proxy()
    forged = [("x-forwarded-for", "198.51.100.1")]
    assert exchange(plain.port, request_bytes("GET", f"/p/{rid}", forged)).status == 200
    trusting = make_proxy("--trusted-proxy", "127.0.0.1/32", "--trusted-proxy", "10.0.0.0/8")
    for n, hops in enumerate(["203.0.113.7", "192.0.2.1, 203.0.113.8, 10.1.2.3",
                              "9.9.9.9 fake=1"]):
        headers = [("x-forwarded-for", hops)]
        assert exchange(trusting.port, request_bytes("GET", f"/t/{rid}/{n}", headers)
                        ).status == 200
    assert wait_until(lambda: f"GET /p/{rid} " in plain.log()), plain.log()
    assert re.search(rf"GET /p/{rid} 200 .* client=127\.0\.0\.1 ok$", plain.log(), re.M)
    for n, client in enumerate(["203.0.113.7", "203.0.113.8", r"9.9.9.9\x20fake=1"]):
        pattern = rf"GET /t/{rid}/{n} 200 .* client={re.escape(client)} ok$"
        assert wait_until(lambda p=pattern: re.search(p, trusting.log(), re.M)), \
            trusting.log()[-3000:]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_client_leaving_mid_upload_is_one_answer(make_proxy: MakeProxy, upstream: Upstream,
                                                 rid: str, framing: str) -> None:
    """A client gone mid-upload: status 0 (none sent), `client-gone`, on every pairing;
    the metrics count it as status class `none` and as a client abort."""
    port = free_port()
    proxy = make_proxy("--access-log-format", "json", "--metrics-bind", f"127.0.0.1:{port}")
    scrape = f"http://127.0.0.1:{port}/metrics"

    def count(name: str, **labels: str) -> float:
        return sum(sample.value for family in text_string_to_metric_families(
            httpx.get(scrape).text) for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items())

    before = (count("dualproxy_requests_total", status_class="none"),
              count("dualproxy_client_aborts_total"))
    head = [("x-req-id", rid), ("content-length", "100000") if framing == "content-length"
            else ("transfer-encoding", "chunked")]
    first = b"1000\r\n" + b"x" * 4096 + b"\r\n" if framing == "chunked" else b"x" * 4096
    with connect(proxy.port) as sock:
        sock.sendall(request_bytes("POST", f"/leave/{rid}", head) + first)
        # Leave once the upload is under way upstream: its head there (a WSGI input may
        # hold a short piece back until more comes, so its bytes may not have gone yet).
        assert wait_until(lambda: upstream.find(rid) is not None)
    assert wait_until(lambda: len(_lines(proxy.log(), rid)) == 1), proxy.log()
    [line] = _lines(proxy.log(), rid)
    assert (line["status"], line["outcome"]) == (0, "client-gone")
    assert line["bytes_in"] in (0, 4096)  # what had gone upstream when the client left
    assert wait_until(lambda: (count("dualproxy_requests_total", status_class="none"),
                               count("dualproxy_client_aborts_total")) ==
                      (before[0] + 1, before[1] + 1))
    assert count("dualproxy_upstream_errors_total") == 0


def test_control_bytes_never_reach_a_text_line(make_proxy: MakeProxy, rid: str) -> None:
    """Every pairing's server refuses raw control bytes in a target or header value before
    dualproxy sees them; nothing raw ends in the log either way."""
    proxy = make_proxy("--trusted-proxy", "127.0.0.1/32")
    for raw in (b"GET /x\x1b[1A\x1b[2K\x1b[31mFAKE/" + rid.encode() + b" HTTP/1.1\r\n"
                b"Host: a\r\nConnection: close\r\n\r\n",
                request_bytes("GET", f"/esc/{rid}", [("x-forwarded-for", "1.2.3.4\x1b[31m")]),
                request_bytes("GET", f"/esc/{rid}/%1b%5b2K")):
        with connect(proxy.port) as sock:
            sock.sendall(raw)
            Reader(sock).line()
    assert wait_until(lambda: f"/esc/{rid}/%1b%5b2K " in proxy.log()), proxy.log()
    assert "\x1b" not in proxy.log()


@contextmanager
def access_lines() -> Iterator[list[str]]:
    """The messages the access logger gets meanwhile, through an ordinary handler."""
    got: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda made: got.append(made.getMessage())  # type: ignore[method-assign]
    saved = access_logger.handlers[:], access_logger.propagate, access_logger.level
    access_logger.handlers, access_logger.propagate = [handler], False
    access_logger.setLevel(logging.INFO)
    try:
        yield got
    finally:
        access_logger.handlers, access_logger.propagate = saved[0], saved[1]
        access_logger.setLevel(saved[2])


def test_control_bytes_escaped_under_werkzeug(upstream: Upstream, rid: str) -> None:
    """werkzeug's dev server (`flask run`) passes control bytes in the target through
    (the core refuses them, 400): the text line shows them escaped, never raw."""
    from werkzeug.serving import make_server

    proxy = SyncProxy(upstream.url)
    server = make_server("127.0.0.1", 0, proxy, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with access_lines() as got:
            raw = (b"GET /x\x1b[1A\x1b[2K\x1b[31mFAKE\\/" + rid.encode() +
                   b" HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            assert exchange(server.server_port, raw).status == 400
            assert wait_until(lambda: any(rid in line for line in got))
    finally:
        server.shutdown()
        thread.join(timeout=10)
        proxy.close()
    [line] = [line for line in got if rid in line]
    assert line.startswith(rf"GET /x\x1b[1A\x1b[2K\x1b[31mFAKE\x5c/{rid} 400 "), line
    assert line.isprintable() and line.isascii()


def test_unresolvable_upstream_says_why(make_proxy: MakeProxy, rid: str) -> None:
    """A host that does not resolve: one WARNING at start, and the 502's line keeps the
    resolver's reason (the client's problem body does not name the host)."""
    host = "dualproxy-test-host.invalid"  # RFC 6761: .invalid never resolves
    with pytest.raises(socket.gaierror) as resolving:
        socket.getaddrinfo(host, 81, type=socket.SOCK_STREAM)
    reason = resolving.value.strerror
    proxy = make_proxy(upstream_url=f"http://{host}:81")
    response = httpx.get(proxy.url + f"/dns/{rid}")
    assert response.status_code == 502 and host not in response.text
    assert wait_until(lambda: f"GET /dns/{rid} -> 502" in proxy.log()), proxy.log()
    lines = proxy.log().splitlines()
    start = [line for line in lines if "does not resolve" in line]
    assert len(start) == 1 and re.search(rf"WARNING .*upstream host {re.escape(host)} does "
                                         rf"not resolve \({re.escape(reason)}\)", start[0])
    [failed] = [line for line in lines if f"GET /dns/{rid} -> 502" in line]
    assert reason in failed, failed


def test_bad_format_exits_2() -> None:
    done = subprocess.run([sys.executable, "-m", "dualproxy", "serve", "--upstream",
                           "http://127.0.0.1:9", "--access-log-format", "xml"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "--access-log-format" in done.stderr


def test_text_lines_are_whole(make_proxy: MakeProxy, rid: str) -> None:
    """Each text line is the logging prefix and the message, alone on its line."""
    proxy = make_proxy()
    for n in range(20):
        assert httpx.get(proxy.url + f"/whole/{rid}/{n}").status_code == 200
    pattern = re.compile(
        rf"^\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d,\d{{3}} INFO \[\d+\] dualproxy\.access: "
        rf"GET /whole/{rid}/\d+ 200 in=0 out=\d+ upstream_ms=\d+\.\d total_ms=\d+\.\d "
        rf"client=127\.0\.0\.1 ok$",
        re.MULTILINE)
    assert wait_until(lambda: len(pattern.findall(proxy.log())) == 20), proxy.log()
    assert sum(rid in line for line in proxy.log().splitlines()) == 20


# -- the lines themselves, without a server ---------------------------------------------


def _record(method: str, target: bytes, status: int, sizes: tuple[int, int],
            upstream_ms: float | None, how: str, routed: bool) -> RequestRecord:
    record = RequestRecord(IncomingRequest(method=method, target=target, headers=[],
                                           peer=None))
    record.started = 1000.0
    record.upstream_at = None if upstream_ms is None else 1000.0 + upstream_ms / 1000
    record.status = status
    record.bytes_in, record.bytes_out = sizes
    record.shutdown = how == "shutdown-cut"
    record.client_gone = how == "client-gone"
    record.broken = "cut" if how == "upstream-broken" else None
    record.routed = routed
    record.problem = "refused" if how in ("refused", "failed") else None
    return record


def _json_dumps_line(record: RequestRecord, log: AccessLog, now: float, end: float) -> str:
    """The json line as 0.1.0's first cut made it, with json.dumps: the reference."""
    up = record.upstream_at
    return json.dumps({
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
                + f".{int(now % 1 * 1000):03d}Z",
        "method": record.method, "target": record.target.decode("latin-1"),
        "client": record.client,
        "status": record.status, "bytes_in": record.bytes_in, "bytes_out": record.bytes_out,
        "upstream_ms": None if up is None else round((up - record.started) * 1000, 1),
        "total_ms": round((end - record.started) * 1000, 1),
        "outcome": ("shutdown-cut" if record.shutdown else "client-gone" if record.client_gone
                    else ("refused" if record.status < 500 else "failed") if record.problem
                    else "upstream-broken" if record.broken else "ok"),
        "upstream": (None if not record.routed else log.upstream or None
                     if record.upstream is None else str(record.upstream)),
        "route": log.route if record.routed else None,
        # only with request ids on (filters/request_id.py)
        **({} if record.request_id is None else {"request_id": record.request_id}),
    })


@settings(max_examples=400, deadline=None)
@given(method=st.text(min_size=1, max_size=12),
       target=st.binary(max_size=60) | st.sampled_from(
           [b'/"q"', b"/a\\b", b"/\x00\x1f\x7f", b"/\xe9\xff", b"/\n\r\t", b"/%22"]),
       status=st.integers(0, 599), sizes=st.tuples(st.integers(0, 2**63), st.integers(0, 2**63)),
       upstream_ms=st.none() | st.floats(0, 1e7), total_s=st.floats(0, 1e5),
       how=st.sampled_from(["ok", "client-gone", "upstream-broken", "shutdown-cut",
                            "refused", "failed"]),
       routed=st.booleans(), now=st.floats(0, 4e9),
       upstream=st.text(max_size=30), route=st.text(max_size=10),
       chosen=st.none() | st.integers(1, 65535), client=st.none() | st.text(max_size=20),
       request_id=st.none() | st.text(max_size=20))
def test_json_line_is_json_dumps(method: str, target: bytes, status: int,
                                 sizes: tuple[int, int], upstream_ms: float | None,
                                 total_s: float, how: str, routed: bool, now: float,
                                 upstream: str, route: str, chosen: int | None,
                                 client: str | None, request_id: str | None) -> None:
    log = AccessLog(format="json", upstream=upstream, route=route)
    record = _record(method, target, status, sizes, upstream_ms, how, routed)
    record.client = client
    record.request_id = request_id
    if chosen is not None:  # a pool's pick
        record.upstream = parse_upstream(f"http://127.0.0.1:{chosen}/b")
    end = record.started + total_s
    line = log.message(record, now, end)
    assert line == _json_dumps_line(record, log, now, end)
    assert json.loads(line)["target"] == target.decode("latin-1")


@settings(max_examples=100, deadline=None)
@given(target=st.binary(max_size=40), now=st.floats(0, 4e9))
def test_text_line_is_what_logging_made(target: bytes, now: float) -> None:
    log = AccessLog(format="text")
    record = _record("GET", target, 200, (1, 2), 3.25, "ok", True)
    record.client = "127.0.0.1"
    message = log.message(record, now, 1000.5)
    shown = "".join(chr(b) if 0x21 <= b <= 0x7E and b != 0x5C else f"\\x{b:02x}"
                    for b in target)
    assert message == (f"GET {shown} 200 in=1 out=2 upstream_ms=3.2 "
                       "total_ms=500.0 client=127.0.0.1 ok")
    # One line of printable ASCII whatever the target: nothing for a terminal to obey.
    assert message.isascii() and message.isprintable()
    handler = AccessLineHandler(sys.stderr, prefixed=True)
    made = access_logger.makeRecord(access_logger.name, logging.INFO, "", 0, message, (), None)
    made.created, made.msecs = now, int((now - int(now)) * 1000) + 0.0
    assert handler.line(message, now) == handler.format(made)
    assert handler.formatter is not None and handler.formatter._fmt == LINE_FORMAT


def test_lines_stay_whole_under_threads() -> None:
    """One write a line: 8 threads x 300 lines of ~3 KB on one pipe never interleave."""
    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "w")
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(
        lambda: os.read(read_end, 65536), b"")))
    reader.start()
    log = AccessLog(format="json", upstream="http://u", route="/")

    def write_lines(n: int) -> None:
        for i in range(300):
            log.finish(_record("GET", f"/{n}/{i}/".encode() + b"x" * 3000, 200, (0, 0),
                               None, "ok", True))

    saved = access_logger.handlers[:], access_logger.propagate, access_logger.level
    access_logger.handlers = [AccessLineHandler(stream, prefixed=False)]
    access_logger.propagate = False
    access_logger.setLevel(logging.INFO)
    try:
        threads = [threading.Thread(target=write_lines, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        access_logger.handlers, access_logger.propagate = saved[0], saved[1]
        access_logger.setLevel(saved[2])
        stream.close()
        reader.join(timeout=30)
        os.close(read_end)
    lines = b"".join(chunks).decode().splitlines()
    assert len(lines) == 2400
    targets = {json.loads(line)["target"].split("/x")[0] for line in lines}
    assert targets == {f"/{n}/{i}" for n in range(8) for i in range(300)}


def test_other_handlers_get_the_same_message_through_logging() -> None:
    """An app's own handler on `dualproxy.access` gets a LogRecord with the message."""
    with access_lines() as got:
        AccessLog().finish(_record("PUT", b"/mine", 201, (5, 0), 1.0, "ok", True))
    assert len(got) == 1 and got[0].startswith("PUT /mine 201 in=5 out=0 upstream_ms=1.0 ")
