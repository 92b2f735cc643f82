"""Graceful drain: SIGTERM stops accepting, lets in-flight transfers finish within
`--graceful-timeout`, cuts what is left, and the process exits 0.

Each test starts its own `dualproxy serve` (it is killed here), on every pairing.
"""

from __future__ import annotations

import hashlib
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from tests.conftest import ProxyProcess, xfail_on_granian
from tests.rawhttp import wait_until
from tests.test_websocket import open_ws
from tests.upstream import Upstream, pattern_sha256
from tests.ws_upstream import WsUpstream

DOWNLOAD = 200 << 20
UPLOAD = 200 << 20


@pytest.fixture
def drain_proxy(pairing: str, upstream: Upstream) -> Iterator[ProxyProcess]:
    proc = ProxyProcess(pairing, upstream.url, ("--graceful-timeout", "3"))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def ws_upstream() -> Iterator[WsUpstream]:
    server = WsUpstream().start()
    yield server
    server.stop()


def no_traceback(proxy: ProxyProcess) -> None:
    """Nothing but the access line tells of a cut: no traceback, no server ERROR line."""
    log = proxy.log()
    for sign in ("Traceback", "ERROR", "Error while closing socket"):
        assert sign not in log, log


def outcomes(proxy: ProxyProcess, request: str) -> list[str]:
    """The outcome word of each access line for `request` ("GET /t")."""
    return [line.rsplit(" ", 1)[1] for line in proxy.log().splitlines()
            if f"dualproxy.access: {request} " in line]


def terminate(proxy: ProxyProcess, signum: int = signal.SIGTERM) -> None:
    os.kill(proxy.proc.pid, signum)


def exit_code(proxy: ProxyProcess, timeout: float = 15) -> int:
    return proxy.proc.wait(timeout=timeout)


def test_download_in_flight_completes(drain_proxy: ProxyProcess,
                                      signum: int = signal.SIGTERM) -> None:
    digest = hashlib.sha256()
    got = 0
    with drain_proxy.client() as client, client.stream(
            "GET", "/d", headers={"x-upstream": f"download size={DOWNLOAD}"}) as resp:
        assert resp.status_code == 200
        for chunk in resp.iter_raw(1 << 20):
            if got == 0:
                terminate(drain_proxy, signum)
            digest.update(chunk)
            got += len(chunk)
            time.sleep(0.005)  # slow enough to be in flight when SIGTERM lands
    assert (got, digest.hexdigest()) == (DOWNLOAD, pattern_sha256(DOWNLOAD))
    assert exit_code(drain_proxy) == 0, drain_proxy.log()
    no_traceback(drain_proxy)


def test_download_in_flight_completes_with_workers(pairing: str, upstream: Upstream) -> None:
    proxy = ProxyProcess(pairing, upstream.url, ("--graceful-timeout", "3", "--workers", "2"))
    try:
        test_download_in_flight_completes(proxy)
    finally:
        proxy.stop()


def test_one_sigint_drains_too(drain_proxy: ProxyProcess) -> None:
    test_download_in_flight_completes(drain_proxy, signal.SIGINT)


def test_upload_in_flight_completes(drain_proxy: ProxyProcess) -> None:
    block = b"u" * (1 << 20)

    def body() -> Iterator[bytes]:
        for i in range(UPLOAD // len(block)):
            if i == 1:
                terminate(drain_proxy)
            time.sleep(0.005)
            yield block

    with drain_proxy.client() as client:
        resp = client.post("/u", content=body())
    assert resp.status_code == 200, resp.text
    echo = resp.json()
    expected = hashlib.sha256(block * (UPLOAD // len(block))).hexdigest()
    assert (echo["body_length"], echo["body_sha256"]) == (UPLOAD, expected)
    assert exit_code(drain_proxy) == 0, drain_proxy.log()
    no_traceback(drain_proxy)


def test_stream_longer_than_grace_is_cut(drain_proxy: ProxyProcess) -> None:
    started = time.monotonic()
    with drain_proxy.client() as client, client.stream(
            "GET", "/t", headers={"x-upstream": "trickle size=200 interval=0.25"}) as resp:
        assert resp.status_code == 200
        with pytest.raises(httpx.HTTPError):
            for _ in resp.iter_raw():
                if started and time.monotonic() - started > 0.5:
                    terminate(drain_proxy)
                    signalled = time.monotonic()
                    started = 0.0
    cut_after = time.monotonic() - signalled
    assert 2.5 < cut_after < 5.0, cut_after  # --graceful-timeout 3
    assert exit_code(drain_proxy) == 0, drain_proxy.log()
    # The proxy itself ends the stream at the timeout and says so, once, on every server.
    assert outcomes(drain_proxy, "GET /t") == ["shutdown-cut"], drain_proxy.log()
    assert "Cancel 1 running task" not in drain_proxy.log()  # not uvicorn's cancellation
    no_traceback(drain_proxy)


def test_upload_longer_than_grace_is_cut(drain_proxy: ProxyProcess) -> None:
    block = b"u" * 65536
    signalled = 0.0

    def body() -> Iterator[bytes]:
        nonlocal signalled
        for i in range(400):  # 100 s at 4 blocks a second
            if i == 2:
                terminate(drain_proxy)
                signalled = time.monotonic()
            time.sleep(0.25)
            yield block

    with drain_proxy.client() as client:
        try:
            resp = client.post("/u", content=body(), timeout=15)
            answer = str(resp.status_code)
        except httpx.HTTPError as exc:
            answer = type(exc).__name__
    ended_after = time.monotonic() - signalled
    # The client may still be sending when the 503 comes and the connection closes.
    assert answer in ("503", "WriteError", "RemoteProtocolError", "ReadError"), answer
    assert 2.5 < ended_after < 5.0, ended_after  # --graceful-timeout 3
    assert exit_code(drain_proxy) == 0, drain_proxy.log()
    assert outcomes(drain_proxy, "POST /u") == ["shutdown-cut"], drain_proxy.log()
    no_traceback(drain_proxy)

def test_request_waiting_for_its_upstream_gets_503_at_the_timeout(
        drain_proxy: ProxyProcess) -> None:
    started = time.monotonic()
    timer = threading.Timer(0.5, terminate, (drain_proxy,))
    timer.start()
    with drain_proxy.client() as client:
        resp = client.get("/slow", headers={"x-upstream": "sleep seconds=20"}, timeout=15)
    answered_after = time.monotonic() - started - 0.5
    assert resp.status_code == 503, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    assert 2.5 < answered_after < 5.0, answered_after  # --graceful-timeout 3
    assert exit_code(drain_proxy) == 0, drain_proxy.log()
    assert outcomes(drain_proxy, "GET /slow") == ["shutdown-cut"], drain_proxy.log()
    no_traceback(drain_proxy)

def hold_stream(proxy: ProxyProcess, size: int) -> threading.Thread:
    """A thread reading GET /t, a stream of `size` bytes at 4 a second, to its end or cut."""
    def hold() -> None:
        try:
            with proxy.client() as client, client.stream(
                    "GET", "/t", headers={"x-upstream": f"trickle size={size} interval=0.25"}
            ) as resp:
                for _ in resp.iter_raw():
                    pass
        except httpx.HTTPError:
            pass

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    return holder


def test_new_connection_after_sigterm_is_refused(drain_proxy: ProxyProcess) -> None:
    holder = hold_stream(drain_proxy, 40)  # an in-flight stream keeps the process draining
    time.sleep(0.5)
    terminate(drain_proxy)
    time.sleep(1.0)
    assert drain_proxy.alive()
    with pytest.raises(OSError):
        with socket.create_connection(("127.0.0.1", drain_proxy.port), timeout=2) as sock:
            sock.settimeout(2)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            if not sock.recv(16):
                raise ConnectionResetError("closed without an answer")
    assert exit_code(drain_proxy) == 0, drain_proxy.log()
    holder.join(10)


def stop_with_websocket(pairing: str, ws_upstream: WsUpstream, rid: str, workers: str,
                        drained: bool) -> float:
    """SIGTERM (--graceful-timeout 2) a proxy with a WebSocket open; `drained`: a message
    is still relayed 0.5 s after. Checks that both sides get close 1001, the exit and
    the log; returns the seconds from the signal to the client's close."""
    proxy = ProxyProcess(pairing, ws_upstream.url,
                         ("--graceful-timeout", "2", "--workers", workers))
    try:
        with open_ws(proxy, rid=rid) as ws:
            ws.send("before")
            assert ws.recv(timeout=5) == "before"
            terminate(proxy)
            signalled = time.monotonic()
            if drained:
                time.sleep(0.5)
                ws.send("draining")  # still relayed until the graceful timeout
                assert ws.recv(timeout=5) == "draining"
            with pytest.raises(ConnectionClosed) as info:
                while True:
                    ws.recv(timeout=10)
            closed_after = time.monotonic() - signalled
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001, info.value
        assert ws_upstream.wait_closed(rid, timeout=5).close_code == 1001
        assert exit_code(proxy) == 0, proxy.log()
        assert outcomes(proxy, "GET /echo") == ["shutdown-cut"], proxy.log()
        no_traceback(proxy)
        return closed_after
    finally:
        proxy.stop()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_websocket_open_at_the_timeout_closes_1001(pairing: str, ws_upstream: WsUpstream,
                                                  rid: str, workers: str,
                                                  request: pytest.FixtureRequest) -> None:
    xfail_on_granian(request, "ws-stop")
    closed_after = stop_with_websocket(pairing, ws_upstream, rid, workers, drained=True)
    assert 1.5 < closed_after < 4.0, closed_after


def test_websocket_gets_1001_from_the_stop(pairing: str, ws_upstream: WsUpstream,
                                          rid: str) -> None:
    """Whatever the server does with an open WebSocket while it stops (kept until the
    graceful timeout, or closed as the stop begins on granian), both sides get a close
    frame 1001 from the proxy, never a dropped connection, and the worker exits 0."""
    closed_after = stop_with_websocket(pairing, ws_upstream, rid, "1", drained=False)
    assert closed_after < 4.0, closed_after


def test_second_sigint_exits_at_once(pairing: str, upstream: Upstream) -> None:
    proxy = ProxyProcess(pairing, upstream.url, ("--graceful-timeout", "30"))
    try:
        hold_stream(proxy, 400)  # a download far longer than this test
        time.sleep(0.5)
        terminate(proxy, signal.SIGINT)
        time.sleep(1.0)
        assert proxy.alive()  # the first SIGINT drains
        terminate(proxy, signal.SIGINT)
        second = time.monotonic()
        # Every pairing exits 0 within a second: the proxy cuts what is left at once
        # (gunicorn's quick stop would otherwise kill its workers 2 s later).
        assert exit_code(proxy, timeout=10) == 0, proxy.log()
        assert time.monotonic() - second < 2.0, proxy.log()
        assert outcomes(proxy, "GET /t") == ["shutdown-cut"], proxy.log()
        no_traceback(proxy)
    finally:
        proxy.stop()


def serving_pids(proxy: ProxyProcess, first: int, last: int) -> set[str]:
    """The worker pids whose access lines answered GET /hup/<first..last-1>."""
    found = re.findall(r"\[(\d+)\] dualproxy\.access: GET /hup/(\d+) ", proxy.log())
    return {pid for pid, i in found if first <= int(i) < last}


def get_once_more_if_unseen(client: httpx.Client, proxy: ProxyProcess, upstream: Upstream,
                            path: str) -> httpx.Response:
    """GET `path`; if the server closed the keep-alive connection as the request went out
    (an old worker closing its idle connections: a race no server can close), send it
    again, as RFC 9112 section 9.3.1 lets a client do for an idempotent request, but only
    when neither the upstream nor the proxy's access log saw the first one: a request the
    proxy read and then dropped stays a failure."""
    try:
        return client.get(path)
    except httpx.RemoteProtocolError as exc:
        if "without sending a response" not in str(exc):
            raise
        time.sleep(0.5)  # a request on its way would have reached the upstream by now
        seen = [rec for rec in upstream.records if rec.target == path.encode()]
        if seen or f"GET {path} " in proxy.log():
            raise
        return client.get(path)


def test_hup_reload_serves_every_request(pairing: str, upstream: Upstream) -> None:
    """gunicorn's HUP reload and uvicorn's (with --workers: its supervisor starts each
    new worker before it stops the old one) keep answering a keep-alive client."""
    proxy = ProxyProcess(pairing, upstream.url, ("--graceful-timeout", "3", "--workers", "2"))
    try:
        failures: list[str] = []
        before: set[str] = set()
        with proxy.client() as client:
            deadline = time.monotonic() + 20
            for i in range(3000):
                if i == 50:
                    before = serving_pids(proxy, 0, 50)
                    os.kill(proxy.proc.pid, signal.SIGHUP)
                try:
                    resp = get_once_more_if_unseen(client, proxy, upstream, f"/hup/{i}")
                    if resp.status_code != 200:
                        failures.append(f"{i}: {resp.status_code}")
                except httpx.HTTPError as exc:
                    failures.append(f"{i}: {exc!r}")
                time.sleep(0.005)
                if i >= 100 and i % 25 == 0 and before and serving_pids(
                        proxy, i - 25, i).isdisjoint(before) or time.monotonic() > deadline:
                    break
        assert before and serving_pids(proxy, i - 25, i).isdisjoint(before), proxy.log()
        assert not failures, (failures, proxy.log())
        assert proxy.alive()
        no_traceback(proxy)
    finally:
        proxy.stop()


# -- the drain clock itself (issue 17, item 14: suspected races, proved or fixed) -------------


class Exchange:
    """A registered exchange that records its cut."""

    def __init__(self) -> None:
        self.cuts = 0
        self.was_cut = threading.Event()

    def cut(self) -> None:
        self.cuts += 1
        self.was_cut.set()


def test_threads_asking_at_once_share_one_wake_pipe() -> None:
    """32 threads ask for the wake fd at the same moment: they get one pipe, and it is
    readable once the deadline passed (two pipes: one would never be written)."""
    import sys

    from dualproxy.drain import Drain

    for _ in range(5):  # a race: several rounds make it show on code that has it
        drain = Drain()
        barrier = threading.Barrier(32)
        fds: list[int] = []

        def ask(drain: Drain = drain, barrier: threading.Barrier = barrier,
                fds: list[int] = fds) -> None:
            barrier.wait()
            fds.append(drain.wake_fd())

        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)
        try:
            threads = [threading.Thread(target=ask) for _ in range(32)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            sys.setswitchinterval(interval)
        drain.arm(30)
        drain.end_now()
        assert len(set(fds)) == 1, sorted(set(fds))
        assert select.select(fds[:1], [], [], 10)[0]


def test_signal_handlers_start_no_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """begin() and end_now() run in signal handlers: they start no thread (Thread.start
    takes threading's locks, which the interrupted code may hold), yet the clock runs."""
    from dualproxy.drain import Drain

    drain = Drain()
    drain.arm(0.2)
    exchange = Exchange()
    drain.enter(exchange)
    started: list[threading.Thread] = []
    real_start = threading.Thread.start

    def start(thread: threading.Thread) -> None:
        started.append(thread)
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    drain.begin()
    drain.begin()
    assert started == []
    assert exchange.was_cut.wait(10)
    drain.end_now()  # after the deadline: nothing more happens
    assert started == [] and exchange.cuts == 1


def test_a_second_sigint_ends_now_without_a_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    from dualproxy.drain import Drain

    drain = Drain()
    drain.arm(60)
    exchange = Exchange()
    drain.enter(exchange)
    monkeypatch.setattr(threading.Thread, "start", lambda thread: pytest.fail("a thread"))
    drain.begin()
    drain.end_now()
    assert exchange.was_cut.wait(10)


def test_an_exchange_entering_after_the_deadline_is_cut_at_once() -> None:
    """A request that starts after the graceful timeout (a keep-alive connection's next
    request) is cut at once, not left running unbounded."""
    from dualproxy.drain import Drain

    drain = Drain()
    drain.arm(0.01)
    drain.begin()
    first = Exchange()
    drain.enter(first)
    assert first.was_cut.wait(10)
    assert wait_until(lambda: drain.expired)
    late = Exchange()
    drain.enter(late)
    assert late.cuts == 1
    drain.leave(late)
    assert first.cuts == 1



# -- a cut that comes as a body piece arrives is not lost (asyncio.wait_for dropped it) ------


def test_a_cut_arriving_with_a_body_piece_still_ends_the_read() -> None:
    """The drain's cancel and the client's next piece land in one loop turn: the read
    must end cancelled. asyncio.wait_for (Python <= 3.11) returned the piece and dropped
    the cancel, so the upload went on until the server killed the task."""
    import asyncio

    from dualproxy.asgi import receive_within

    async def main() -> str:
        loop = asyncio.get_running_loop()
        for _ in range(20):
            piece: asyncio.Future[dict[str, object]] = loop.create_future()

            async def receive(piece: asyncio.Future[dict[str, object]] = piece
                              ) -> dict[str, object]:
                return await piece

            task = asyncio.ensure_future(receive_within(receive, 5.0))
            for _ in range(3):
                await asyncio.sleep(0)
            piece.set_result({"type": "http.request", "body": b"x", "more_body": True})
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                continue
            return "the piece was returned and the cancel dropped"
        return "cancelled"

    assert asyncio.run(main()) == "cancelled"


def test_a_silent_client_ends_the_read_as_stalled_and_a_cut_stays_a_cut() -> None:
    import asyncio

    from dualproxy.asgi import receive_within
    from dualproxy.errors import ClientTimeout

    async def never() -> dict[str, object]:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def stalled() -> str:
        try:
            await receive_within(never, 0.05)
        except ClientTimeout as exc:
            return str(exc)
        return "no timeout"

    assert "0.05 s" in asyncio.run(stalled())

    async def cut() -> str:
        task = asyncio.ensure_future(receive_within(never, 5.0))
        await asyncio.sleep(0.01)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return "cancelled"
        return "not cancelled"

    assert asyncio.run(cut()) == "cancelled"


# -- a stop that comes while the proxy is still starting ---------------------------------------


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("when", ["metrics-up", "0.3", "0.8"])
def test_a_stop_while_starting_still_stops(pairing: str, upstream: Upstream, when: str,
                                           workers: str) -> None:
    """SIGTERM once, early: as a container's stop right after its health check passed (the
    metrics port is up before the server takes over signals), or at a fixed moment of the
    start. The proxy exits; on uvicorn a SIGTERM that came before uvicorn listened for it
    was swallowed by the handler that only takes note, and the proxy ran on (with one
    worker in uvicorn's server, with more in its supervisor)."""
    from tests.conftest import ROOT, free_port

    port, metrics = free_port(), free_port()
    adapter, server = pairing.split("-")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dualproxy", "serve", "--upstream", upstream.url,
         "--adapter", adapter, "--server", server, "--bind", f"127.0.0.1:{port}",
         "--metrics-bind", f"127.0.0.1:{metrics}", "--graceful-timeout", "2",
         "--workers", workers],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    try:
        if when == "metrics-up":
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    if httpx.get(f"http://127.0.0.1:{metrics}/healthz", timeout=1).is_success:
                        break
                except httpx.HTTPError:
                    time.sleep(0.02)
            else:
                raise AssertionError("the metrics port never answered")
        else:
            time.sleep(float(when))
        proc.send_signal(signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            raise AssertionError("a SIGTERM while starting did not stop the proxy") from None
        # 0 once the server's handlers (or ours before uvicorn's) took the signal; before
        # those, Python's default ends the process by the signal: stopped either way.
        assert proc.returncode in (0, -signal.SIGTERM), output
        assert "Traceback" not in output.decode(), output
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_group_signalled_twice_still_stops(pairing: str, upstream: Upstream,
                                             rid: str) -> None:
    """SIGTERM to the whole process group, twice, while a request is in flight (as
    `kill -TERM -PGID` repeated, or a supervisor that repeats itself): each worker gets
    it from us and from its main process. The request is finished and the proxy exits 0.
    granian's worker blocked for good on its second stop signal (its WorkerSignal sends
    on a full channel that nothing reads), and the proxy never exited."""
    # Its own proxy, not the pool's: this one is stopped here.
    proxy = ProxyProcess(pairing, upstream.url, ("--workers", "2", "--graceful-timeout", "5"))
    try:
        _signal_twice_mid_request(proxy, upstream, rid)
    finally:
        proxy.stop()


def _signal_twice_mid_request(proxy: ProxyProcess, upstream: Upstream, rid: str) -> None:
    answers: list[httpx.Response | BaseException] = []

    def slow() -> None:
        try:
            answers.append(httpx.get(f"{proxy.url}/slow", timeout=15, headers={
                "x-req-id": rid, "x-upstream": "sleep seconds=1"}))
        except httpx.HTTPError as exc:
            answers.append(exc)

    client = threading.Thread(target=slow)
    client.start()
    upstream.wait_record(rid)  # in flight: the upstream sleeps before it answers
    for _ in range(2):
        os.killpg(proxy.proc.pid, signal.SIGTERM)
        time.sleep(0.1)
    try:
        proxy.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running 15 s after two SIGTERMs:\n{proxy.log()}") from None
    client.join(15)
    assert proxy.proc.returncode == 0, proxy.log()
    assert len(answers) == 1 and isinstance(answers[0], httpx.Response), answers
    assert answers[0].status_code == 200, proxy.log()
