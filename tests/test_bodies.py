"""Bodies both ways, on every pairing (DESIGN "Bodies").

Uploads keep their framing (Content-Length as sent, chunked otherwise, nothing
when there is no body) and stream upstream before they end; downloads stream
down chunk by chunk as raw bytes (SSE, gzip untouched, 100 MB hashed end to end);
statuses, HEAD, redirects, `Expect: 100-continue`, the body-size limit and
keep-alive behave as a client of nginx's `proxy_pass` would expect.
"""

from __future__ import annotations

import hashlib
import json
import random
import socket
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import MakeProxy, ProxyProcess
from tests.rawhttp import (
    RawResponse,
    Reader,
    connect,
    exchange,
    read_head,
    read_response,
    request_bytes,
    wait_until,
)
from tests.upstream import Upstream, gzip_pattern, pattern_bytes, pattern_sha256

pytestmark = pytest.mark.pairings

MiB = 1 << 20
LIMIT = 1_000_000  # --max-body-size for the 413 tests


def random_body(n: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(n)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def chunk_sizes(n: int) -> list[int]:
    """Uneven chunk sizes covering n bytes (odd sizes catch re-framing bugs)."""
    sizes: list[int] = []
    cycle = [65536, 1, 30000, 100_003, 4096, 65535]
    i = 0
    while sum(sizes) < n:
        sizes.append(min(cycle[i % len(cycle)], n - sum(sizes)))
        i += 1
    return sizes


def chunked(data: bytes, sizes: Iterable[int] | None = None, *, last: bool = True) -> bytes:
    """`data` in HTTP/1.1 chunked coding (with the final chunk unless last=False)."""
    out = bytearray()
    offset = 0
    for size in sizes if sizes is not None else chunk_sizes(len(data)):
        out += b"%x\r\n" % size + data[offset:offset + size] + b"\r\n"
        offset += size
    assert offset == len(data)
    if last:
        out += b"0\r\n\r\n"
    return bytes(out)


def head_bytes(method: str, target: str, headers: list[tuple[str, str]]) -> bytes:
    """A request head only (no body, no added framing)."""
    return request_bytes(method, target, headers)


def echo_of(resp: RawResponse | httpx.Response) -> dict[str, Any]:
    body = resp.body if isinstance(resp, RawResponse) else resp.content
    data: dict[str, Any] = json.loads(body)
    return data


def framing_headers(names: list[str]) -> list[str]:
    return [n for n in names if n in ("content-length", "transfer-encoding")]


def _send_pieces(sock: socket.socket, data: bytes, stop: threading.Event) -> None:
    """Send data in 64 KiB pieces until done, stopped, or the peer gives up (a thread)."""
    for start in range(0, len(data), 65536):
        if stop.is_set():
            return
        try:
            sock.sendall(data[start:start + 65536])
        except OSError:
            return


def _stop_sender(sock: socket.socket, thread: threading.Thread, stop: threading.Event) -> None:
    stop.set()
    try:
        sock.shutdown(socket.SHUT_RDWR)  # wakes a sendall blocked on a full window
    except OSError:
        pass
    thread.join(10)


# ---------------------------------------------------------------------------- uploads


def test_upload_10mb_content_length(proxy: ProxyProcess, upstream: Upstream, rid: str) -> None:
    body = random_body(10 * MiB)
    resp = exchange(proxy.port, request_bytes("POST", "/upload", [("x-req-id", rid)], body))
    assert resp.status == 200 and resp.complete
    rec = upstream.wait_record(rid, complete=True)
    assert rec.complete and not rec.aborted
    assert rec.framing == "content-length"
    assert rec.content_length == len(body)
    assert rec.header_all("content-length") == [str(len(body))]
    assert rec.header("transfer-encoding") is None
    assert rec.body_length == len(body)
    assert rec.body_sha256 == sha256(body)
    echo = echo_of(resp)
    assert echo["framing"] == "content-length"
    assert echo["body_length"] == len(body)
    assert echo["body_sha256"] == sha256(body)


def test_upload_10mb_chunked(proxy: ProxyProcess, upstream: Upstream, rid: str) -> None:
    body = random_body(10 * MiB, seed=8)
    raw = head_bytes("POST", "/upload", [("x-req-id", rid), ("Transfer-Encoding", "chunked")])
    resp = exchange(proxy.port, raw + chunked(body))
    assert resp.status == 200 and resp.complete
    rec = upstream.wait_record(rid, complete=True)
    assert rec.complete and not rec.aborted
    # No length was declared: the proxy streams it on chunked, never both.
    assert rec.framing == "chunked"
    assert rec.header("content-length") is None
    assert rec.header_all("transfer-encoding") == ["chunked"]
    assert rec.body_length == len(body)
    assert rec.body_sha256 == sha256(body)
    echo = echo_of(resp)
    assert echo["framing"] == "chunked"
    assert echo["body_length"] == len(body)
    assert echo["body_sha256"] == sha256(body)


def test_upload_10mb_httpx_generator(proxy: ProxyProcess, upstream: Upstream, rid: str) -> None:
    body = random_body(10 * MiB, seed=9)

    def pieces() -> Iterable[bytes]:
        for start in range(0, len(body), 100_000):
            yield body[start:start + 100_000]

    with proxy.client() as client:
        resp = client.post("/gen", content=pieces(), headers={"x-req-id": rid})
    assert resp.status_code == 200
    rec = upstream.wait_record(rid, complete=True)
    assert rec.complete and rec.framing == "chunked"
    assert rec.body_sha256 == sha256(body)
    assert echo_of(resp)["body_sha256"] == sha256(body)


@pytest.mark.parametrize("method", ["GET", "DELETE", "POST"])
def test_no_body_no_framing(proxy: ProxyProcess, upstream: Upstream, rid: str,
                            method: str) -> None:
    resp = exchange(proxy.port, request_bytes(method, "/nobody", [("x-req-id", rid)]))
    assert resp.status == 200
    rec = upstream.wait_record(rid, complete=True)
    assert rec.method == method
    assert rec.framing == "none"
    assert framing_headers(rec.header_names()) == []
    assert rec.complete and rec.body_length == 0
    echo = echo_of(resp)
    assert echo["method"] == method and echo["framing"] == "none"


def test_content_length_zero_forwarded(proxy: ProxyProcess, upstream: Upstream,
                                       rid: str) -> None:
    raw = request_bytes("POST", "/zero", [("x-req-id", rid), ("Content-Length", "0")])
    resp = exchange(proxy.port, raw)
    assert resp.status == 200
    rec = upstream.wait_record(rid, complete=True)
    assert rec.framing == "content-length"
    assert rec.content_length == 0
    assert rec.header_all("content-length") == ["0"]
    assert rec.header("transfer-encoding") is None
    assert rec.complete and rec.body_length == 0
    assert echo_of(resp)["framing"] == "content-length"


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
def test_upload_streams_before_it_ends(proxy: ProxyProcess, upstream: Upstream, rid: str,
                                       framing: str) -> None:
    """The upstream sees the first 256 KiB while the client still holds the rest."""
    body = random_body(2 * MiB, seed=10)
    first, rest = body[:256 * 1024], body[256 * 1024:]
    headers = [("x-req-id", rid)]
    if framing == "chunked":
        headers.append(("Transfer-Encoding", "chunked"))
        part1 = chunked(first, [65536] * 4, last=False)
        part2 = chunked(rest, [65536] * (len(rest) // 65536))
    else:
        headers.append(("Content-Length", str(len(body))))
        part1, part2 = first, rest
    with connect(proxy.port) as sock:
        sock.sendall(head_bytes("POST", "/stream-up", headers) + part1)
        started = wait_until(
            lambda: (r := upstream.find(rid)) is not None and r.t_first_body is not None,
            timeout=15)
        rec = upstream.find(rid)
        assert started, f"upstream saw no body before the upload ended: {rec!r}"
        assert rec is not None and not rec.final
        sock.sendall(part2)
        resp = read_response(Reader(sock))
    assert resp.status == 200
    rec = upstream.wait_record(rid, complete=True)
    assert rec.complete and rec.framing == framing
    assert rec.body_length == len(body) and rec.body_sha256 == sha256(body)
    assert echo_of(resp)["body_sha256"] == sha256(body)


def test_early_upstream_answer_during_upload(proxy: ProxyProcess, upstream: Upstream,
                                             rid: str) -> None:
    """An upstream that answers (401) before reading a large upload has its answer relayed."""
    body = random_body(4 * MiB, seed=14)
    head = head_bytes("POST", "/early", [("x-req-id", rid), ("Content-Length", str(len(body))),
                                         ("x-upstream", "status code=401 early=1")])
    stop = threading.Event()
    with connect(proxy.port) as sock:
        sock.sendall(head)
        thread = threading.Thread(target=_send_pieces, args=(sock, body, stop), daemon=True)
        thread.start()
        try:
            resp = read_response(Reader(sock), "POST")
        finally:
            _stop_sender(sock, thread, stop)
    rec = upstream.wait_record(rid, complete=False)
    assert not rec.complete  # the upstream never read the body
    assert resp.status == 401, resp
    assert resp.body == b"status 401"


# ---------------------------------------------------------------------------- downloads


@pytest.mark.parametrize("chunked_down", [False, True], ids=["content-length", "chunked"])
def test_download_streams_while_upstream_blocked(proxy: ProxyProcess, upstream: Upstream,
                                                 rid: str, chunked_down: bool) -> None:
    size = 1 * MiB
    gate_name = f"dl-{rid}"
    gate = upstream.gate(gate_name)
    spec = f"download size={size} gate={gate_name}" + (" chunked=1" if chunked_down else "")
    digest = hashlib.sha256()
    try:
        timeout = httpx.Timeout(30.0, read=8.0)
        with httpx.Client(base_url=proxy.url, timeout=timeout) as client, client.stream(
                "GET", "/dl", headers={"x-req-id": rid, "x-upstream": spec}) as resp:
            assert resp.status_code == 200
            chunks = resp.iter_raw()
            try:
                first = next(chunks)
            except httpx.ReadTimeout:
                pytest.fail("no body bytes reached the client while the upstream was blocked")
            # The upstream is still parked on the gate: only its first chunk is out.
            assert not gate.is_set()
            assert 0 < len(first) <= 65536
            digest.update(first)
            gate.set()
            total = len(first)
            for piece in chunks:
                digest.update(piece)
                total += len(piece)
        if chunked_down:
            assert resp.headers.get("content-length") is None
        else:
            assert resp.headers["content-length"] == str(size)
            assert resp.headers.get("transfer-encoding") is None
    finally:
        gate.set()
    assert total == size
    assert digest.hexdigest() == pattern_sha256(size)
    assert upstream.wait_record(rid).method == "GET"


def test_sse_events_arrive_one_by_one(proxy: ProxyProcess, upstream: Upstream,
                                      rid: str) -> None:
    count, interval = 5, 0.4
    arrivals: list[float] = []
    events: list[bytes] = []
    buf = b""
    with proxy.client() as client, client.stream(
            "GET", "/events",
            headers={"x-req-id": rid, "accept": "text/event-stream",
                     "x-upstream": f"sse count={count} interval={interval}"}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"] == "text/event-stream"
        for piece in resp.iter_raw():
            buf += piece
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                events.append(event)
                arrivals.append(time.monotonic())
        ended = time.monotonic()
    assert events == [f"data: event-{i}".encode() for i in range(count)]
    rec = upstream.wait_record(rid)
    # The upstream writes event i no earlier than t_head + i*interval. Event 0
    # reaching the client before the last event was even produced proves that
    # nothing waits for the end of the stream; the spread proves no batching.
    last_produced_not_before = rec.t_head + (count - 1) * interval
    assert arrivals[0] < last_produced_not_before, "first event held back until the end"
    assert arrivals[-1] - arrivals[0] >= interval, f"events batched: {arrivals}"
    assert all(a <= ended for a in arrivals)


@pytest.mark.slow
@pytest.mark.parametrize("chunked_down", [False, True], ids=["content-length", "chunked"])
def test_download_100mb_hashed(proxy: ProxyProcess, upstream: Upstream, rid: str,
                               chunked_down: bool) -> None:
    size = 100 * MiB
    spec = f"download size={size}" + (" chunked=1 chunk=1048576" if chunked_down else "")
    digest = hashlib.sha256()
    total = 0
    with proxy.client() as client, client.stream(
            "GET", "/big", headers={"x-req-id": rid, "x-upstream": spec}) as resp:
        assert resp.status_code == 200
        for piece in resp.iter_raw():
            digest.update(piece)
            total += len(piece)
    if chunked_down:
        assert resp.headers.get("content-length") is None
        assert resp.headers.get("transfer-encoding") == "chunked"
    else:
        assert resp.headers["content-length"] == str(size)
        assert resp.headers.get("transfer-encoding") is None
    assert total == size
    assert digest.hexdigest() == pattern_sha256(size)
    assert upstream.wait_record(rid).method == "GET"


def tree_rss(pid: int) -> int:
    """Resident memory in bytes of a process and all its descendants."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def warm_rss(proxy: ProxyProcess, rid: str) -> int:
    """The proxy tree's RSS once it has served a download: the first request's one-time
    set-up (the upstream client, its pool, first buffers) is growth no test should count."""
    response = exchange(proxy.port, request_bytes("GET", "/warm", [
        ("x-req-id", f"{rid}-warm"), ("x-upstream", f"download size={MiB}")]))
    assert response.status == 200 and response.complete
    return tree_rss(proxy.proc.pid)


@pytest.mark.slow
def test_slow_client_backpressure(proxy: ProxyProcess, upstream: Upstream, rid: str) -> None:
    """A client that stops reading stalls the upstream instead of filling the proxy."""
    size = 256 * MiB
    allowed_growth = 64 * MiB  # kernel buffers hold some; a buffering proxy holds ~all
    before = warm_rss(proxy, rid)
    digest = hashlib.sha256()
    with connect(proxy.port) as sock:
        sock.sendall(request_bytes("GET", "/slow-reader", [
            ("x-req-id", rid), ("x-upstream", f"download size={size}")]))
        reader = Reader(sock)
        status, _, headers, _ = read_head(reader)
        assert status == 200
        assert dict((k.lower(), v) for k, v in headers)["content-length"] == str(size)
        # Stop reading; give a buffering proxy ample time to swallow the download.
        grew = wait_until(lambda: tree_rss(proxy.proc.pid) - before > allowed_growth,
                          timeout=3, interval=0.1)
        growth = tree_rss(proxy.proc.pid) - before
        assert not grew, f"proxy memory grew by {growth >> 20} MiB while the client stalled"
        # Now drain it all and check nothing was lost.
        total = len(reader.buf)
        digest.update(reader.buf)
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        while total < size:
            n = sock.recv_into(view, min(len(buf), size - total))
            if n == 0:
                break
            digest.update(view[:n])
            total += n
    assert total == size
    assert digest.hexdigest() == pattern_sha256(size)
    assert upstream.wait_record(rid).method == "GET"


@pytest.mark.slow
@pytest.mark.parametrize("chunked_down", [False, True], ids=["content-length", "chunked"])
def test_client_reading_1kb_per_second_from_1gb(proxy: ProxyProcess, upstream: Upstream,
                                                rid: str, chunked_down: bool) -> None:
    """A client that reads 1 KB/s from a 1 GiB response: the proxy's memory stays flat
    (within 32 MiB of where it started) for the 4 s watched, and the bytes it does
    read are the right ones."""
    size = 1 << 30
    before = peak = warm_rss(proxy, rid)
    spec = f"download size={size}" + (" chunked=1" if chunked_down else "")
    with connect(proxy.port) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the pace is ours
        sock.sendall(request_bytes("GET", "/trickle-reader", [("x-req-id", rid),
                                                              ("x-upstream", spec)]))
        reader = Reader(sock)
        status, _, _, _ = read_head(reader)
        assert status == 200
        got = bytearray(reader.buf)
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            got += sock.recv(100)
            peak = max(peak, tree_rss(proxy.proc.pid))
            time.sleep(0.1)
    assert upstream.wait_record(rid).method == "GET"
    growth = peak - before
    assert growth < 32 * MiB, f"proxy memory grew by {growth >> 20} MiB from {before >> 20} MiB"
    if not chunked_down:  # chunk-size lines interleave otherwise
        assert bytes(got) == pattern_bytes(len(got)), "the bytes read are not the upstream's"
    assert proxy.alive()


@pytest.mark.parametrize("chunked_down", [False, True], ids=["content-length", "chunked"])
def test_gzip_passed_raw(proxy: ProxyProcess, upstream: Upstream, rid: str,
                         chunked_down: bool) -> None:
    size = 300_000
    expected = gzip_pattern(size)
    spec = f"download size={size} gzip=1" + (" chunked=1" if chunked_down else "")
    raw = request_bytes("GET", "/gz", [("x-req-id", rid), ("x-upstream", spec),
                                       ("Accept-Encoding", "gzip")])
    resp = exchange(proxy.port, raw)
    assert resp.status == 200 and resp.complete
    assert resp.header("content-encoding") == "gzip"
    assert resp.body == expected  # the compressed bytes, untouched
    if chunked_down:
        assert resp.framing == "chunked"
    else:
        assert resp.framing == "content-length"
        assert resp.header("content-length") == str(len(expected))
        assert resp.header("transfer-encoding") is None
    rec = upstream.wait_record(rid)
    assert rec.header("accept-encoding") == "gzip"


# ---------------------------------------------------------------------------- statuses


def _then_echo(sock: socket.socket, reader: Reader, rid: str) -> RawResponse:
    """A second request on the same connection (proves the first left it clean)."""
    sock.sendall(request_bytes("GET", "/second", [("x-req-id", rid + "-2")]))
    return read_response(reader)


@pytest.mark.parametrize("code", [200, 201, 204, 301, 302, 304, 404, 418, 500, 503])
def test_status_relayed(proxy: ProxyProcess, upstream: Upstream, rid: str, code: int) -> None:
    with connect(proxy.port) as sock:
        reader = Reader(sock)
        sock.sendall(request_bytes("GET", "/status", [
            ("x-req-id", rid), ("x-upstream", f"status code={code}")]))
        resp = read_response(reader)
        assert resp.status == code and resp.complete
        if code in (204, 304):
            assert resp.body == b""
            assert resp.header("transfer-encoding") is None
            if code == 204:
                assert resp.header("content-length") is None
        else:
            assert resp.body == f"status {code}".encode()
            assert resp.header("content-length") == str(len(resp.body))
        # No stray body bytes: the next response on the connection parses cleanly.
        second = _then_echo(sock, reader, rid)
    assert second.status == 200 and echo_of(second)["target"] == "/second"
    assert upstream.wait_record(rid).method == "GET"
    assert len(upstream.find_all(rid)) == 1


def test_head_keeps_headers_and_connection(proxy: ProxyProcess, upstream: Upstream,
                                           rid: str) -> None:
    with connect(proxy.port) as sock:
        reader = Reader(sock)
        sock.sendall(request_bytes("HEAD", "/file", [
            ("x-req-id", rid), ("x-upstream", "download size=12345")]))
        resp = read_response(reader, "HEAD")
        assert resp.status == 200
        assert resp.header("content-length") == "12345"
        assert resp.header("content-type") == "application/octet-stream"
        second = _then_echo(sock, reader, rid)
        # Nothing followed the HEAD response but the second response.
        assert second.status == 200 and echo_of(second)["target"] == "/second"
    rec = upstream.wait_record(rid)
    assert rec.method == "HEAD" and rec.framing == "none"


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_redirect_relayed_not_followed(proxy: ProxyProcess, upstream: Upstream, rid: str,
                                       code: int) -> None:
    elsewhere = "http://elsewhere.invalid/next?x=1"
    resp = exchange(proxy.port, request_bytes("GET", "/redir", [
        ("x-req-id", rid), ("x-upstream", f"status code={code} location={elsewhere}")]))
    assert resp.status == code
    assert resp.header_all("location") == [elsewhere]
    assert resp.body == f"status {code}".encode()
    # A redirect back to the upstream itself is not followed either.
    rid2 = rid + "-self"
    resp2 = exchange(proxy.port, request_bytes("POST", "/redir", [
        ("x-req-id", rid2),
        ("x-upstream", f"status code={code} location={upstream.url}/followed")], b"data"))
    assert resp2.status == code
    assert resp2.body == f"status {code}".encode()
    assert resp2.header("location") is not None
    assert upstream.wait_record(rid2, complete=True).complete
    time.sleep(0.2)
    assert len(upstream.find_all(rid)) == 1
    assert len(upstream.find_all(rid2)) == 1
    assert not [r for r in upstream.records if r.target == b"/followed"]


# ---------------------------------------------------------------------------- 100-continue


def test_expect_100_continue(proxy: ProxyProcess, upstream: Upstream, rid: str) -> None:
    body = random_body(300_000, seed=11)
    head = head_bytes("PUT", "/expect", [("x-req-id", rid), ("Expect", "100-continue"),
                                         ("Content-Length", str(len(body)))])
    with connect(proxy.port, timeout=30) as sock:
        sock.sendall(head)
        sock.settimeout(5)
        reader = Reader(sock)
        try:
            line = reader.line()
        except TimeoutError:
            pytest.fail("no 100 Continue from the proxy within 5 s")
        assert line is not None and line.startswith(b"HTTP/1.1 100"), line
        assert reader.line() == b""  # end of the interim head
        early = upstream.find(rid)
        assert early is None or early.body_length == 0
        sock.settimeout(30)
        sock.sendall(body)
        resp = read_response(reader, "PUT")
    assert resp.status == 200
    assert echo_of(resp)["body_sha256"] == sha256(body)
    rec = upstream.wait_record(rid, complete=True)
    assert rec.complete and rec.body_sha256 == sha256(body)
    assert rec.content_length == len(body)
    # The front server answered the expectation; the upstream must not be asked again.
    assert rec.header("expect") is None


# ---------------------------------------------------------------------------- 413


def _is_problem(resp: RawResponse, status: int) -> None:
    assert resp.status == status
    assert resp.header("content-type") == "application/problem+json"
    doc = json.loads(resp.body)
    assert doc["status"] == status


def test_413_content_length(make_proxy: MakeProxy, upstream: Upstream, rid: str) -> None:
    proxy = make_proxy("--max-body-size", str(LIMIT))
    size = 2 * LIMIT
    head = head_bytes("POST", "/too-big", [("x-req-id", rid), ("Content-Length", str(size))])
    with connect(proxy.port) as sock:
        # Head and a first slice only: the declared length alone decides.
        sock.sendall(head + random_body(65536))
        resp = read_response(Reader(sock), "POST")
    _is_problem(resp, 413)
    assert not wait_until(lambda: upstream.find(rid) is not None, timeout=0.5)


def test_413_chunked(make_proxy: MakeProxy, upstream: Upstream, rid: str) -> None:
    proxy = make_proxy("--max-body-size", str(LIMIT))
    body = random_body(2 * LIMIT, seed=12)
    payload = chunked(body, [65536] * (len(body) // 65536) + [len(body) % 65536])
    head = head_bytes("POST", "/too-big", [("x-req-id", rid),
                                           ("Transfer-Encoding", "chunked")])
    stop = threading.Event()
    with connect(proxy.port) as sock:
        sock.sendall(head)
        thread = threading.Thread(target=_send_pieces, args=(sock, payload, stop), daemon=True)
        thread.start()
        try:
            resp = read_response(Reader(sock), "POST")
        finally:
            _stop_sender(sock, thread, stop)
    _is_problem(resp, 413)
    # Whatever reached the upstream was cut off, never completed.
    wait_until(lambda: (r := upstream.find(rid)) is None or r.final, timeout=10)
    rec = upstream.find(rid)
    assert rec is None or (rec.final and rec.aborted and not rec.complete), rec
    if rec is not None:
        assert rec.body_length <= LIMIT


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_body_under_limit_passes(make_proxy: MakeProxy, upstream: Upstream, rid: str,
                                 framing: str) -> None:
    proxy = make_proxy("--max-body-size", str(LIMIT))
    body = random_body(900_000, seed=13)
    if framing == "chunked":
        raw = head_bytes("POST", "/ok", [("x-req-id", rid),
                                         ("Transfer-Encoding", "chunked")]) + chunked(body)
    else:
        raw = request_bytes("POST", "/ok", [("x-req-id", rid)], body)
    resp = exchange(proxy.port, raw)
    assert resp.status == 200
    assert echo_of(resp)["body_sha256"] == sha256(body)
    rec = upstream.wait_record(rid, complete=True)
    assert rec.complete and rec.framing == framing
    assert rec.body == body


# ---------------------------------------------------------------------------- keep-alive


def test_keep_alive_many_requests(proxy: ProxyProcess, upstream: Upstream, rid: str) -> None:
    bodies = [random_body(n, seed=n) for n in (0, 10, 70_000, 300_000)]
    with connect(proxy.port) as sock:
        reader = Reader(sock)
        for i in range(12):
            req_id = f"{rid}-{i}"
            body = bodies[i % len(bodies)]
            kind = i % 3
            if kind == 0:
                raw = request_bytes("GET", f"/ka/{i}", [("x-req-id", req_id)])
                body = b""
            elif kind == 1:
                raw = request_bytes("POST", f"/ka/{i}", [("x-req-id", req_id)], body)
            else:
                raw = head_bytes("PUT", f"/ka/{i}", [("x-req-id", req_id),
                                                     ("Transfer-Encoding", "chunked")])
                raw += chunked(body, chunk_sizes(len(body))) if body else b"0\r\n\r\n"
            sock.sendall(raw)
            resp = read_response(reader)
            assert resp.status == 200 and resp.complete, (i, resp)
            echo = echo_of(resp)
            assert echo["target"] == f"/ka/{i}"
            assert echo["body_sha256"] == sha256(body)
            rec = upstream.wait_record(req_id, complete=True)
            assert rec.complete and rec.body_length == len(body)
        assert not reader.eof


def test_pipelined_requests_after_length_bodies(proxy: ProxyProcess, upstream: Upstream,
                                                rid: str) -> None:
    """Three requests in one write (two Content-Length uploads, then a GET): each body
    ends exactly at its length and the next request starts right after it."""
    bodies = [random_body(n, seed=n) for n in (5_000, 200_000)]
    raw = b"".join(request_bytes("POST", f"/pipe/{i}", [("x-req-id", f"{rid}-{i}")], body)
                   for i, body in enumerate(bodies))
    raw += request_bytes("GET", "/pipe/2", [("x-req-id", f"{rid}-2")])
    with connect(proxy.port) as sock:
        sock.sendall(raw)
        reader = Reader(sock)
        for i, body in enumerate([*bodies, b""]):
            resp = read_response(reader)
            assert resp.status == 200 and resp.complete, (i, resp.status, resp.body[:200])
            echo = echo_of(resp)
            assert echo["target"] == f"/pipe/{i}"
            assert echo["body_sha256"] == sha256(body)
            assert upstream.wait_record(f"{rid}-{i}", complete=True).body_length == len(body)
