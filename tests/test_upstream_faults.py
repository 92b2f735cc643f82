"""Broken and slow upstreams through every pairing (issue 17): nothing lost, nothing stuck.

A scripted raw-socket upstream (tests/test_transport.py's) misbehaves per path:
it resets after part of a close-delimited body, trickles its head, sends
trailers without end; like many servers it closes a connection left idle for
0.5 s. The client must see a broken response as broken (no final chunk), a slow
head as a 504 at `--timeout`, and a connection the upstream closed while pooled
must never carry the next request.
"""

from __future__ import annotations

import asyncio
import select
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from dualproxy.balancer import Balancer
from dualproxy.config import ProxyConfig
from dualproxy.health import HealthTask
from dualproxy.http1 import AsyncUpstreamTransport
from tests.conftest import MakeProxy, ProxyProcess
from tests.rawhttp import Reader, connect, exchange, read_response, request_bytes, wait_until
from tests.test_transport import Peer, Upstream, response

BIG = 1258291  # 1.2 MiB: the read that brings its end can cross the 1 MiB high-water mark
IDLE_CLOSE = 0.5  # the upstream closes a connection idle this long


def _reset_mid_body(peer: Peer) -> None:
    peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + b"x" * 1000)
    time.sleep(0.2)
    peer.reset()


def _trickle_head(peer: Peer) -> None:
    for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok":
        peer.sock.sendall(bytes([byte]))  # raises once the proxy left: the script ends
        time.sleep(0.3)


TRAILERS = 64 << 20  # "endless" trailers: 64 MiB, then silence (the script ends by itself)


class Faulty:
    """The scripted upstream: one behaviour per path, idle connections closed."""

    def __init__(self) -> None:
        self.big_sent = threading.Event()
        self.trailers_all_sent = threading.Event()
        self.server = Upstream(self._script)

    def _endless_trailers(self, peer: Peer) -> None:
        peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n")
        lines = (b"X-More: " + b"t" * 90 + b"\r\n") * 100
        for _ in range(TRAILERS // len(lines)):
            peer.sock.sendall(lines)  # raises once the proxy left: the script ends
        self.trailers_all_sent.set()
        peer.wait_eof()

    def _script(self, peer: Peer) -> None:
        while (seen := peer.read_request()) is not None:
            path = seen.request_line.split(b" ")[1].split(b"?")[0]
            if path == b"/reset":
                return _reset_mid_body(peer)
            if path == b"/trickle":
                return _trickle_head(peer)
            if path == b"/trailers":
                return self._endless_trailers(peer)
            if path == b"/pause":
                time.sleep(0.02)
                peer.send(response(b"ok"))
            elif path == b"/big":
                peer.send(response(b"b" * BIG))
                self.big_sent.set()
            else:
                peer.send(response(b"ok"))
            if not peer.buf and not select.select([peer.sock], [], [], IDLE_CLOSE)[0]:
                return  # idle for IDLE_CLOSE: closed

    def connections_closed(self) -> bool:
        return all(peer.done.is_set() for peer in self.server.peers)


@pytest.fixture(scope="module")
def faulty() -> Iterator[Faulty]:
    upstream = Faulty()
    yield upstream
    upstream.server.close()


@pytest.fixture
def faulty_proxy(make_proxy: MakeProxy, faulty: Faulty) -> ProxyProcess:
    return make_proxy("--timeout", "1", upstream_url=faulty.server.url)


def _outcome(proxy: ProxyProcess, request: str) -> str | None:
    """The outcome word of the access line for `request` ("GET /x?id"), once written."""
    for line in proxy.log().splitlines():
        if f"dualproxy.access: {request} " in line:
            return line.rsplit(" ", 1)[1]
    return None


def _target(path: str) -> str:
    return f"{path}?{uuid.uuid4().hex[:8]}"


def test_reset_mid_body_aborts_the_client(faulty_proxy: ProxyProcess) -> None:
    """An upstream reset after 1000 bytes of a close-delimited body (SO_LINGER 0): the
    client sees the response cut, as curl straight to the upstream does (exit 56)."""
    target = _target("/reset")
    answer = exchange(faulty_proxy.port, request_bytes("GET", target))
    assert answer.status == 200
    assert not answer.complete, answer  # no final chunk: an incomplete read
    assert len(answer.body) <= 1000
    assert wait_until(lambda: _outcome(faulty_proxy, f"GET {target}") is not None)
    assert _outcome(faulty_proxy, f"GET {target}") == "upstream-broken", faulty_proxy.log()


def test_endless_trailers_abort_the_client(faulty_proxy: ProxyProcess, faulty: Faulty) -> None:
    """The trailer section is bounded as a head is (64 KiB): past it, a broken upstream."""
    target = _target("/trailers")
    answer = exchange(faulty_proxy.port, request_bytes("GET", target))
    assert answer.status == 200
    assert not answer.complete, answer
    assert not faulty.trailers_all_sent.is_set()  # the proxy stopped reading them
    assert wait_until(lambda: _outcome(faulty_proxy, f"GET {target}") is not None)
    assert _outcome(faulty_proxy, f"GET {target}") == "upstream-broken", faulty_proxy.log()


def test_trickled_head_is_a_504_at_the_timeout(faulty_proxy: ProxyProcess) -> None:
    """`--timeout 1` bounds connect plus the whole head, however it trickles (a byte
    every 0.3 s would take 12 s): 504, not a 502 nor the late answer."""
    started = time.monotonic()
    answer = exchange(faulty_proxy.port, request_bytes("GET", _target("/trickle")))
    elapsed = time.monotonic() - started
    assert answer.status == 504, answer
    assert elapsed < 4.0, elapsed  # generous: the head would take 12 s


def test_pooled_connection_closed_by_the_upstream_is_not_reused(
        faulty_proxy: ProxyProcess, faulty: Faulty) -> None:
    """GET 1.2 MiB read slowly (the proxy's last upstream read can cross its high-water
    mark and pause reading), the upstream closes the idle connection, then POSTs:
    a body is never retried, so each must find a connection that is still open."""
    for _ in range(5):  # the pause falls on the last read about every other round
        faulty.big_sent.clear()
        with connect(faulty_proxy.port) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
            sock.sendall(request_bytes("GET", _target("/big")))
            assert faulty.big_sent.wait(10)
            time.sleep(0.2)  # the proxy holds what the client does not read yet
            got = read_response(Reader(sock))
        assert (got.status, len(got.body), got.complete) == (200, BIG, True)
        # every upstream connection the proxy had is closed: the pooled one too
        assert wait_until(faulty.connections_closed), "the upstream kept a connection"
        for _ in range(10):
            post = exchange(faulty_proxy.port, request_bytes("POST", _target("/post"),
                                                             body=b"data"))
            assert (post.status, post.body) == (200, b"ok"), post


def test_pool_slots_survive_an_overload(make_proxy: MakeProxy, faulty: Faulty) -> None:
    """One upstream connection, a pool timeout as short as an answer takes, ten clients
    at once: slots are handed over as waiters' timeouts fire. Each must come back
    (on Python 3.12+ one handed in the step its waiter timed out was lost, and with
    it the pool: 503 to everything after)."""
    proxy = make_proxy("--max-connections", "1", "--pool-timeout", "0.02",
                       upstream_url=faulty.server.url)

    def client(_: int) -> list[int]:
        with proxy.client() as http:
            return [http.get("/pause").status_code for _ in range(10)]

    with ThreadPoolExecutor(10) as clients:
        statuses = [status for batch in clients.map(client, range(10)) for status in batch]
    assert set(statuses) <= {200, 503}, statuses
    with proxy.client() as http:  # alone now: the one slot is free
        assert [http.get("/pause").status_code for _ in range(3)] == [200] * 3


def _probe_then_sigterm(pairing: str) -> str | None:
    """The issue's repro: a proxy probing a refused port and a missing unix socket every
    millisecond, SIGTERM after a second of it; None when it exited 0 in time."""
    proxy = ProxyProcess(pairing, "http://127.0.0.1:1", (
        "--upstream", "unix:/nonexistent.sock", "--health-path", "/h",
        "--health-interval", "0.001"))
    try:
        time.sleep(1.0)  # the repro's second of probing
        proxy.proc.send_signal(signal.SIGTERM)
        try:
            code = proxy.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            return f"no exit within 15 s of SIGTERM:\n{proxy.log()[-1500:]}"
        return None if code == 0 else f"exit code {code}:\n{proxy.log()[-1500:]}"
    finally:
        proxy.stop()


def test_sigterm_stops_a_proxy_probing_dead_upstreams(pairing: str) -> None:
    """Probes must not keep SIGTERM from ending the server. Python 3.11's wait_for
    could swallow the prober's cancellation when a connect failed in the same loop
    step (1 run in 4 or 5 here): it probed on, and the process never exited. Six
    runs at once, so that a window that narrow is hit."""
    with ThreadPoolExecutor(6) as runs:
        failures = [f for f in runs.map(_probe_then_sigterm, [pairing] * 6) if f]
    assert not failures, failures[0]


def test_prober_stops_when_stopped_as_a_connect_fails() -> None:
    """The stop lands in the loop step in which a probe's connect fails (made certain
    here by the connect itself asking for the stop as it fails): the prober ends. On
    Python 3.10 and 3.11, wait_for answered the cancellation with the connect's error
    and the prober probed on for ever."""
    config = ProxyConfig.build("unix:/nonexistent.sock", health_path="/h",
                               health_interval=0.001)
    loop = asyncio.new_event_loop()
    transport = AsyncUpstreamTransport()
    probers: list[HealthTask] = []
    real_connect = loop.create_unix_connection

    async def connect_failing_as_stopped(*args: Any, **kwargs: Any) -> Any:
        loop.call_soon(probers[0].stop)  # runs before the connect's waiter wakes
        return await real_connect(*args, **kwargs)

    loop.create_unix_connection = connect_failing_as_stopped  # type: ignore[method-assign]

    async def probe_and_stop() -> bool:
        probers.append(HealthTask(config, Balancer(config.upstreams),
                                  transport.handle_async_request))
        task = probers[0]._task
        await asyncio.wait({task}, timeout=5.0)
        return task.done()

    try:
        stopped = loop.run_until_complete(probe_and_stop())
    finally:
        for task in asyncio.all_tasks(loop):
            task.cancel()  # the old prober, left probing: cancelled until it ends
        loop.close()
    assert stopped, "the prober went on probing after stop()"
