"""DESIGN "Failures", on real servers for every pairing.

Before the response head an upstream failure becomes a small problem+json answer
(502 refused or broken, 504 too slow, 503 pool exhausted), never a traceback.
After the head, a broken upstream makes the proxy abort the client connection,
so a cut body is never passed off as complete. A client that goes away closes
its upstream request and gives the pool slot back; a cut upload is never
completed upstream. The proxy process survives all of it.

Abort tests use a private upstream with exactly one proxy in front of it, so
its `open_connections()` counts that proxy's upstream connections and nothing
else: a drop means the proxy closed the connection of the aborted request.
"""

from __future__ import annotations

import base64
import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import MakeProxy, ProxyPool, ProxyProcess, free_port
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
from tests.upstream import Upstream

MB = 1 << 20
PROBLEM_KEYS = {"type", "title", "status", "detail"}


def get(port: int, rid: str, action: str | None = None, *,
        extra: list[tuple[str, str]] | None = None, timeout: float = 30.0) -> RawResponse:
    headers = [("x-req-id", rid)]
    if action is not None:
        headers.append(("x-upstream", action))
    return exchange(port, request_bytes("GET", "/fail", headers + (extra or [])),
                    timeout=timeout)


def assert_problem(resp: RawResponse, status: int) -> dict[str, object]:
    """A problem+json answer (RFC 9457) with this status and no traceback in it."""
    assert resp.status == status, (resp.status, resp.body[:500])
    assert resp.complete
    assert (resp.header("content-type") or "").startswith("application/problem+json")
    text = resp.body.decode("utf-8")
    assert "Traceback" not in text and 'File "' not in text
    doc = json.loads(text)
    assert PROBLEM_KEYS <= set(doc), doc
    assert doc["status"] == status
    assert isinstance(doc["title"], str) and doc["title"]
    assert isinstance(doc["detail"], str) and doc["detail"]
    return doc  # type: ignore[no-any-return]


def assert_serves(proxy: ProxyProcess, count: int = 40) -> None:
    """`count` sequential requests through the proxy all get the upstream's answer."""
    with proxy.client() as client:
        for i in range(count):
            resp = client.get(f"/after/{i}", headers={"x-req-id": f"after-{time.time_ns()}"})
            assert resp.status_code == 200, (i, resp.status_code, resp.text[:300])
            assert resp.json()["target"] == f"/after/{i}"


@pytest.fixture(scope="module")
def private_upstream() -> Iterator[Upstream]:
    """An upstream only the abort tests' proxy talks to."""
    server = Upstream().start()
    yield server
    server.stop()


@pytest.fixture
def abort_proxy(make_proxy: MakeProxy, private_upstream: Upstream) -> ProxyProcess:
    return make_proxy(upstream_url=private_upstream.url)


def raw_head(rid: str, action: str, *, method: str = "GET",
             framing: tuple[str, str] | None = None) -> bytes:
    lines = [f"{method} /abort HTTP/1.1", "Host: proxy.test", f"x-req-id: {rid}",
             f"x-upstream: {action}"]
    if framing is not None:
        lines.append(f"{framing[0]}: {framing[1]}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# ------------------------------------------------------------------ before the head


def test_refused_upstream_is_502(make_proxy: MakeProxy, rid: str) -> None:
    """Nothing listens on the upstream port: 502 problem+json, and the proxy lives on."""
    proxy = make_proxy(upstream_url=f"http://127.0.0.1:{free_port()}")
    for _ in range(3):  # the same answer every time, not only on a fresh pool
        doc = assert_problem(get(proxy.port, rid), 502)
        assert doc["title"] == "Bad Gateway"
    with proxy.client() as client:  # keep-alive: the unread upload must not poison it
        bodies: list[bytes | Iterator[bytes]] = [
            b"b" * 30, b"b" * 300_000, iter([b"c" * 100_000] * 3), b"b" * 30]
        for body in bodies:  # a Content-Length upload, and a chunked one (an iterator)
            resp = client.post("/x", content=body)
            assert resp.status_code == 502
            assert resp.headers["content-type"].startswith("application/problem+json")
            assert resp.json()["status"] == 502
    assert proxy.alive()


# (case, expected status): an upstream failure after the upload began, a refusal by the
# core before it (outside the mount), and a filter's own answer before it (a 429).
EARLY_ANSWERS = [("upstream-refused", 502), ("outside-mount", 404), ("rate-limited", 429)]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("case,status", EARLY_ANSWERS, ids=[c for c, _ in EARLY_ANSWERS])
def test_an_early_answer_keeps_the_connection_in_step(
        make_proxy: MakeProxy, upstream: Upstream, case: str, status: int,
        chunked: bool) -> None:
    """An answer that comes before a 300 KB upload was read, without `Connection:
    close`: the connection must still take the next request, however late it comes
    (core.early_discard). granian (hyper) closed it unannounced just after the answer,
    and gunicorn after draining a little: a keep-alive client's next request met a
    closed socket (CI saw it as test_refused_upstream_is_502[asgi-granian])."""
    if case == "upstream-refused":
        proxy = make_proxy(upstream_url=f"http://127.0.0.1:{free_port()}")
        target = "/x"
    elif case == "outside-mount":
        proxy = make_proxy("--mount", "/api")
        target = "/elsewhere"
    else:
        proxy = make_proxy("--rate-limit", "1/hour", "--rate-burst", "1")
        target = "/x"
        get(proxy.port, "any")  # the bucket's one request: what follows is 429
    body = b"u" * 300_000
    if chunked:
        framing, payload = "Transfer-Encoding: chunked", b"%x\r\n%s\r\n0\r\n\r\n" % (
            len(body), body)
    else:
        framing, payload = f"Content-Length: {len(body)}", body
    with connect(proxy.port) as sock:
        reader = Reader(sock)
        sock.sendall(f"POST {target} HTTP/1.1\r\nHost: a\r\n{framing}\r\n\r\n".encode()
                     + payload)
        first = read_response(reader, "POST")
        assert first.status == status and first.complete, first.status
        assert (first.header("connection") or "").lower() != "close"
        time.sleep(0.3)  # the unannounced close came within milliseconds
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        second = read_response(reader)
        assert second.status == status and second.complete, second.status
    assert proxy.alive()


def test_upstream_hang_before_head_is_504(make_proxy: MakeProxy, upstream: Upstream,
                                          rid: str) -> None:
    """No response head within --timeout: 504 problem+json, in seconds not minutes."""
    proxy = make_proxy("--timeout", "1")
    start = time.monotonic()
    resp = get(proxy.port, rid, "hang seconds=60", timeout=30)
    elapsed = time.monotonic() - start
    doc = assert_problem(resp, 504)
    assert doc["title"] == "Gateway Timeout"
    assert elapsed < 15, elapsed
    rec = upstream.wait_record(rid)
    assert rec.method == "GET" and rec.target == b"/fail"
    assert proxy.alive()


def test_upstream_reset_before_head_is_502(proxy: ProxyProcess, upstream: Upstream,
                                           rid: str) -> None:
    """The upstream resets the connection after reading the request head: 502."""
    assert_problem(get(proxy.port, rid, "reset"), 502)
    assert upstream.wait_record(rid).target == b"/fail"
    assert proxy.alive()


def test_pool_exhausted_is_503(make_proxy: MakeProxy, upstream: Upstream, rid: str) -> None:
    """The one upstream connection is busy past --pool-timeout: 503, then served again."""
    proxy = make_proxy("--max-connections", "1", "--pool-timeout", "0.5", "--timeout", "5")
    held = connect(proxy.port, timeout=30)
    try:
        held.sendall(raw_head(rid, "hang seconds=60"))
        upstream.wait_record(rid)  # the hang request holds the only connection now
        second = f"{rid}-2"
        doc = assert_problem(get(proxy.port, second), 503)
        assert doc["title"] == "Service Unavailable"
        assert upstream.find(second) is None  # it never reached the upstream
    finally:
        held.close()
    # Closing the first client frees the slot (at once on ASGI; WSGI gets it back at
    # --timeout, when the 504 for the vanished client is written to nobody).
    served: list[int] = []

    def one_request() -> bool:
        resp = get(proxy.port, f"{rid}-{len(served)}-after")
        served.append(resp.status)
        return resp.status == 200

    assert wait_until(one_request, timeout=20, interval=0.2), served
    assert set(served) <= {200, 503}, served
    assert proxy.alive()


# ------------------------------------------------------------------ broken responses


def test_malformed_upstream_response_is_502(proxy: ProxyProcess, upstream: Upstream,
                                            rid: str) -> None:
    """Garbage instead of a status line: 502 problem+json."""
    garbage = base64.b64encode(b"THIS IS NOT HTTP\r\n\x00\x01\x02\r\n\r\n").decode()
    resp = get(proxy.port, rid, "raw close=1", extra=[("x-upstream-raw", garbage)])
    assert_problem(resp, 502)
    assert upstream.wait_record(rid).target == b"/fail"
    assert proxy.alive()


AMBIGUOUS_FRAMING = {
    "cl-and-te": b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n",
    "te-and-cl": b"Transfer-Encoding: chunked\r\nContent-Length: 11\r\n",
    "two-lengths": b"Content-Length: 11\r\nContent-Length: 3\r\n",
}


@pytest.mark.parametrize("framing", list(AMBIGUOUS_FRAMING))
def test_ambiguous_upstream_framing_is_502(proxy: ProxyProcess, upstream: Upstream,
                                           rid: str, framing: str) -> None:
    """Both framing headers, or two lengths, from the upstream is response smuggling
    material (RFC 9112 6.3): 502 (or an aborted connection), never the body relayed
    as a complete response."""
    body = b"b\r\nhello world\r\n0\r\n\r\n" if "te" in framing else b"hello world"
    raw = (b"HTTP/1.1 200 OK\r\n" + AMBIGUOUS_FRAMING[framing]
           + b"Content-Type: text/plain\r\n\r\n" + body)
    resp = get(proxy.port, rid, "raw close=1",
               extra=[("x-upstream-raw", base64.b64encode(raw).decode())], timeout=15)
    if resp.status == 502:
        assert_problem(resp, 502)
    else:
        assert not resp.complete, (resp.status, resp.headers, resp.body)
    assert b"hello world" not in resp.body
    assert upstream.wait_record(rid).target == b"/fail"
    assert proxy.alive()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_upstream_cut_mid_body_aborts_client(proxy: ProxyProcess, upstream: Upstream,
                                             rid: str, chunked: bool) -> None:
    """The upstream closes after 300 kB of 1 MB: the client connection is aborted, with
    no final chunk and no short body passed off as complete."""
    action = "cut size=1000000 after=300000" + (" chunked=1" if chunked else "")
    resp = get(proxy.port, rid, action, timeout=20)
    assert resp.status == 200
    assert resp.framing == ("chunked" if chunked else "content-length")
    if not chunked:
        assert resp.header("content-length") == "1000000"
    assert not resp.complete
    assert len(resp.body) <= 300_000
    assert upstream.wait_record(rid).target == b"/fail"
    assert proxy.alive()


# ------------------------------------------------------------------ idle timeout


def test_quiet_sse_stream_outlives_timeout(make_proxy: MakeProxy, upstream: Upstream,
                                           rid: str) -> None:
    """Gaps of 1.5 s between events, longer than --timeout 1 but within --idle-timeout 3:
    the whole stream arrives."""
    proxy = make_proxy("--timeout", "1", "--idle-timeout", "3")
    resp = get(proxy.port, rid, "sse count=3 interval=1.5", timeout=20)
    assert resp.status == 200 and resp.complete
    assert (resp.header("content-type") or "").startswith("text/event-stream")
    assert resp.body == b"data: event-0\n\ndata: event-1\n\ndata: event-2\n\n"
    assert upstream.wait_record(rid).target == b"/fail"
    assert proxy.alive()


def test_stalled_stream_is_dropped_after_idle_timeout(make_proxy: MakeProxy,
                                                      upstream: Upstream, rid: str) -> None:
    """One byte, then 5 s of silence past --idle-timeout 2: the client connection is
    aborted (no final chunk) well before the trickle would have finished (~45 s)."""
    proxy = make_proxy("--timeout", "1", "--idle-timeout", "2")
    start = time.monotonic()
    resp = get(proxy.port, rid, "trickle size=10 interval=5", timeout=30)
    elapsed = time.monotonic() - start
    assert resp.status == 200
    assert not resp.complete
    assert len(resp.body) < 10
    assert elapsed < 12, elapsed
    assert upstream.wait_record(rid).target == b"/fail"
    assert proxy.alive()


# ------------------------------------------------------------------ client goes away


def _close_upload_midway(port: int, upstream: Upstream, rid: str, chunked: bool) -> None:
    """Send the head and 1 MB of a longer body, wait until body bytes reach the
    upstream (the upload is streaming), then close the connection."""
    sock = connect(port)
    try:
        if chunked:
            sock.sendall(raw_head(rid, "echo", method="POST",
                                  framing=("Transfer-Encoding", "chunked")))
            piece = b"x" * (64 * 1024)
            for _ in range(16):
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        else:
            sock.sendall(raw_head(rid, "echo", method="POST",
                                  framing=("Content-Length", str(10 * MB))))
            sock.sendall(b"x" * MB)
        rec = upstream.wait_record(rid, timeout=15)
        assert wait_until(lambda: rec.body_length > 0, timeout=15)
    finally:
        sock.close()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_client_abort_during_upload_is_never_completed_upstream(
        abort_proxy: ProxyProcess, private_upstream: Upstream, rid: str,
        chunked: bool) -> None:
    """The client sends 1 MB of a larger body and closes: the upstream sees the upload
    aborted (no full length, no terminating chunk), and the pool still serves."""
    _close_upload_midway(abort_proxy.port, private_upstream, rid, chunked)
    rec = private_upstream.wait_record(rid, timeout=15, complete=False)
    assert rec.method == "POST"
    assert rec.framing == ("chunked" if chunked else "content-length")
    if not chunked:
        assert rec.content_length == 10 * MB
    assert not rec.complete and rec.aborted, rec
    assert rec.body_length <= MB
    assert_serves(abort_proxy)
    assert abort_proxy.alive()


def test_client_abort_during_download_closes_upstream(
        abort_proxy: ProxyProcess, private_upstream: Upstream, rid: str) -> None:
    """The client reads 1 MB of 200 MB and closes: the proxy closes that upstream
    connection within seconds while the upstream still sends, and the pool still serves."""
    sock = connect(abort_proxy.port)
    try:
        sock.sendall(raw_head(rid, "download size=200000000 chunked=1"))
        reader = Reader(sock)
        status, _, _, _ = read_head(reader)
        assert status == 200
        _, got_all = reader.exactly(MB)
        assert got_all, "the download ended early"
        private_upstream.wait_record(rid)
        during = private_upstream.open_connections()
        assert during >= 1
    finally:
        sock.close()
    assert wait_until(lambda: private_upstream.open_connections() < during, timeout=15), (
        during, private_upstream.open_connections())
    assert_serves(abort_proxy)
    assert abort_proxy.alive()


def test_client_abort_before_head_returns_the_slot(
        abort_proxy: ProxyProcess, private_upstream: Upstream, rid: str) -> None:
    """The client leaves 0.5 s into a 3 s wait for the head: the pool still serves
    afterwards (on every face; WSGI at the latest once the late answer is read)."""
    sock = connect(abort_proxy.port)
    try:
        sock.sendall(raw_head(rid, "sleep seconds=3"))
        private_upstream.wait_record(rid)
        time.sleep(0.5)
        sock.shutdown(socket.SHUT_RDWR)
    finally:
        sock.close()
    time.sleep(3)  # past the upstream's answer, so every face has settled
    assert_serves(abort_proxy)
    assert abort_proxy.alive()


def test_client_abort_before_head_cancels_upstream(
        abort_proxy: ProxyProcess, private_upstream: Upstream, rid: str) -> None:
    """The client leaves 0.5 s into a wait for the head: the proxy closes the upstream
    request at once (on the WSGI face the transport watches the client's socket under
    gunicorn, the bridge's disconnect event under uvicorn). `hang` closes its side as
    soon as the proxy's FIN arrives, so the upstream's open connections drop at once;
    `sleep` would keep a half-closed connection until it answers and show nothing."""
    seconds = 5.0
    sock = connect(abort_proxy.port)
    try:
        sock.sendall(raw_head(rid, f"hang seconds={seconds}"))
        sent = time.monotonic()
        private_upstream.wait_record(rid)
        during = private_upstream.open_connections()
        time.sleep(max(0.0, 0.5 - (time.monotonic() - sent)))
        sock.shutdown(socket.SHUT_RDWR)
    finally:
        sock.close()
    # Ordering, not timing: the drop must come before the upstream gives up by itself.
    left = seconds - (time.monotonic() - sent) - 0.5
    closed_early = wait_until(lambda: private_upstream.open_connections() < during,
                              timeout=max(left, 0.5))
    # Let the hang end on every face before this proxy serves the next test.
    wait_until(lambda: private_upstream.open_connections() < during, timeout=seconds + 5)
    assert closed_early, "the upstream connection stayed open until the upstream gave up"


def _abort_once(port: int, upstream: Upstream, rid: str, kind: str) -> None:
    """One client abort of `kind`, made once the upstream has the request."""
    sock = connect(port)
    try:
        if kind == "upload":
            sock.sendall(raw_head(rid, "echo", method="POST",
                                  framing=("Content-Length", str(MB))))
            sock.sendall(b"u" * (64 * 1024))
            rec = upstream.wait_record(rid, timeout=15)
            wait_until(lambda: rec.body_length > 0, timeout=15)
        elif kind == "before-head":
            sock.sendall(raw_head(rid, "hang seconds=5"))
            upstream.wait_record(rid, timeout=15)
        else:
            sock.sendall(raw_head(rid, "download size=50000000 chunked=1"))
            status, _, _, _ = read_head(Reader(sock))
            assert status == 200
    finally:
        sock.close()


def test_pool_intact_after_200_client_aborts(
        make_proxy: MakeProxy, private_upstream: Upstream, rid: str) -> None:
    """200 client aborts (during the upload, before the head, during the download) through
    a pool of 4 connections: no upload is completed upstream, every upstream connection of
    an aborted request closes, and afterwards 4 requests that each hold a connection for
    1 s all get one within a 0.5 s pool timeout: no slot is left checked out."""
    proxy = make_proxy("--max-connections", "4", "--pool-timeout", "0.5",
                       upstream_url=private_upstream.url)
    kinds = ("upload", "before-head", "download")
    rids = [f"{rid}-{i}" for i in range(200)]
    for i, each in enumerate(rids):
        _abort_once(proxy.port, private_upstream, each, kinds[i % 3])
    for each in rids[::3]:
        rec = private_upstream.wait_record(each, timeout=15, complete=False)
        assert not rec.complete and rec.body_length < MB, rec
    # Only idle keep-alive connections may stay open, and the pool holds at most 4.
    assert wait_until(lambda: private_upstream.open_connections() <= 4, timeout=20), (
        private_upstream.open_connections())
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(
            lambda i: get(proxy.port, f"{rid}-hold-{i}", "sleep seconds=1"), range(4)))
    assert [a.status for a in answers] == [200] * 4, [(a.status, a.body[:200]) for a in answers]
    assert_serves(proxy)
    assert proxy.alive()


def test_proxies_survived(pairing: str, proxy_pool: ProxyPool) -> None:
    """Every proxy started for the pairing (this file's and any earlier file's) still
    runs and answers: the upstream's 200, a dead upstream's 502, the proxy's own
    404 problem for a path outside its mount (a `--mount` or `--config` proxy), or a
    rate-limited proxy's 429 once its bucket is spent."""
    mine = [p for (pair, _, _), p in proxy_pool.running.items() if pair == pairing]
    assert mine
    for proc in mine:
        assert proc.alive(), proc.log()[-3000:]
        # A proxy serving HTTPS has the test CA's certificate: liveness needs no trust.
        with (proc.client(verify=False) if proc.tls else proc.client()) as client:
            answer = client.get("/alive")
        allowed = (200, 404, 502, 429) if "--rate-limit" in proc.flags else (200, 404, 502)
        assert answer.status_code in allowed, (proc.flags, answer.status_code)
        if answer.status_code == 404:
            assert answer.headers["content-type"] == "application/problem+json"
