"""Access lines: json lines with the right values and whole text lines (every pairing);
the hand-made lines equal what `json.dumps` and `logging` made before (unit tests)."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time

import httpx
from hypothesis import given, settings
from hypothesis import strategies as st

from dualproxy.core import IncomingRequest
from dualproxy.logs import LINE_FORMAT, AccessLineHandler, AccessLog, RequestRecord, access_logger
from dualproxy.upstreams import parse_upstream
from tests.conftest import MakeProxy, free_port
from tests.test_integrations import wait_until


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
    assert (outside["status"], outside["route"], outside["upstream"]) == (404, None, None)

    dead = make_proxy("--access-log-format", "json",
                      upstream_url=f"http://127.0.0.1:{free_port()}")
    assert httpx.get(dead.url + f"/gone/{rid}").status_code == 502
    assert wait_until(lambda: len(_lines(dead.log(), rid)) == 1), dead.log()
    [line] = _lines(dead.log(), rid)
    assert (line["status"], line["upstream_ms"], line["route"]) == (502, None, "/")


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
        rf"GET /whole/{rid}/\d+ 200 in=0 out=\d+ upstream_ms=\d+\.\d total_ms=\d+\.\d ok$",
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
    return record


def _json_dumps_line(record: RequestRecord, log: AccessLog, now: float, end: float) -> str:
    """The json line as 0.1.0's first cut made it, with json.dumps: the reference."""
    up = record.upstream_at
    return json.dumps({
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
                + f".{int(now % 1 * 1000):03d}Z",
        "method": record.method, "target": record.target.decode("latin-1"),
        "status": record.status, "bytes_in": record.bytes_in, "bytes_out": record.bytes_out,
        "upstream_ms": None if up is None else round((up - record.started) * 1000, 1),
        "total_ms": round((end - record.started) * 1000, 1),
        "outcome": ("shutdown-cut" if record.shutdown else "client-gone" if record.client_gone
                    else "upstream-broken" if record.broken else "ok"),
        "upstream": (None if not record.routed else log.upstream or None
                     if record.upstream is None else str(record.upstream)),
        "route": log.route if record.routed else None,
    })


@settings(max_examples=400, deadline=None)
@given(method=st.text(min_size=1, max_size=12),
       target=st.binary(max_size=60) | st.sampled_from(
           [b'/"q"', b"/a\\b", b"/\x00\x1f\x7f", b"/\xe9\xff", b"/\n\r\t", b"/%22"]),
       status=st.integers(0, 599), sizes=st.tuples(st.integers(0, 2**63), st.integers(0, 2**63)),
       upstream_ms=st.none() | st.floats(0, 1e7), total_s=st.floats(0, 1e5),
       how=st.sampled_from(["ok", "client-gone", "upstream-broken", "shutdown-cut"]),
       routed=st.booleans(), now=st.floats(0, 4e9),
       upstream=st.text(max_size=30), route=st.text(max_size=10),
       chosen=st.none() | st.integers(1, 65535))
def test_json_line_is_json_dumps(method: str, target: bytes, status: int,
                                 sizes: tuple[int, int], upstream_ms: float | None,
                                 total_s: float, how: str, routed: bool, now: float,
                                 upstream: str, route: str, chosen: int | None) -> None:
    log = AccessLog(format="json", upstream=upstream, route=route)
    record = _record(method, target, status, sizes, upstream_ms, how, routed)
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
    message = log.message(record, now, 1000.5)
    assert message == (f"GET {target.decode('latin-1')} 200 in=1 out=2 upstream_ms=3.2 "
                       "total_ms=500.0 ok")
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
    got: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda made: got.append(made.getMessage())  # type: ignore[method-assign]
    saved = access_logger.handlers[:], access_logger.propagate, access_logger.level
    access_logger.handlers, access_logger.propagate = [handler], False
    access_logger.setLevel(logging.INFO)
    try:
        AccessLog().finish(_record("PUT", b"/mine", 201, (5, 0), 1.0, "ok", True))
    finally:
        access_logger.handlers, access_logger.propagate = saved[0], saved[1]
        access_logger.setLevel(saved[2])
    assert len(got) == 1 and got[0].startswith("PUT /mine 201 in=5 out=0 upstream_ms=1.0 ")
