"""Nothing stuck (issue 17): a client that leaves or stalls frees what it held, every pairing.

- An upstream answering before it read the upload, with an endless stream: the client
  leaves and the proxy closes that upstream connection within seconds (the
  disconnect watch runs from the start, not only once the body was read).
- `--client-timeout`: a client that stalls mid-upload gets 408 and the upstream's
  request is aborted, never completed.
- An upstream cutting a body is one WARNING line in the proxy's log, no ERROR.

The upstreams here are private raw sockets, so "its connection closed" means exactly
the connection of the request under test.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dualproxy.config import ProxyConfig
from tests.conftest import MakeProxy, ProxyProcess, free_port
from tests.rawhttp import Reader, connect, read_head, read_response, wait_until
from tests.test_failures import assert_problem
from tests.upstream import Upstream

IN_FLIGHT = "dualproxy_requests_in_flight"
IN_USE = "dualproxy_pool_connections_in_use"


class EarlyStreamUpstream:
    """Answers every request at once, before reading any of its body, with an endless
    chunked stream; counts the connections still open (a send that fails: closed)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.heads: list[bytes] = []
        self._open = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def open_connections(self) -> int:
        with self._lock:
            return self._open

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self._open += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                data = conn.recv(65536)
                if not data:
                    return
                head += data
            self.heads.append(head.split(b"\r\n\r\n")[0])
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            piece = b"s" * 1024
            while not self._stop.is_set():
                conn.sendall(b"400\r\n" + piece + b"\r\n")
                time.sleep(0.01)
        except OSError:
            pass
        finally:
            conn.close()
            with self._lock:
                self._open -= 1

    def stop(self) -> None:
        """Stop streaming and listening: the port refuses from here on (a proxy left
        cached in front of it answers 502), the accept thread ends."""
        self._stop.set()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        except OSError:
            pass
        self.listener.close()


@pytest.fixture
def early_upstream() -> Iterator[EarlyStreamUpstream]:
    server = EarlyStreamUpstream()
    yield server
    server.stop()


def scrape(port: int) -> dict[str, float]:
    """The metrics listener's samples, summed by name."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    return sums


def access_lines(proxy: ProxyProcess, target: str) -> list[str]:
    return [line for line in proxy.log().splitlines() if f" {target} " in line
            and "total_ms=" in line]


def test_stream_answered_early_ends_when_the_client_leaves(
        make_proxy: MakeProxy, early_upstream: EarlyStreamUpstream, rid: str) -> None:
    """POST 200 KB: the head and 1000 bytes go, the upstream answers at once with an
    endless stream, the client sends the rest, reads a little and closes. The proxy
    closes the upstream connection within seconds, logs `client-gone`, and the request
    leaves the in-flight count and the pool."""
    metrics_port = free_port()
    proxy = make_proxy("--metrics-bind", f"127.0.0.1:{metrics_port}",
                       upstream_url=early_upstream.url)
    size = 200_000
    target = f"/early/{rid}"
    sock = connect(proxy.port, timeout=10)
    try:
        sock.sendall(f"POST {target} HTTP/1.1\r\nHost: proxy.test\r\n"
                     f"Content-Length: {size}\r\n\r\n".encode() + b"u" * 1000)
        assert wait_until(lambda: len(early_upstream.heads) == 1)  # it answers now
        try:
            sock.sendall(b"u" * (size - 1000))
        except OSError:  # a proxy that stopped reading the upload: what was sent is sent
            pass
        reader = Reader(sock)
        status, _, _, _ = read_head(reader)
        assert status == 200
        _, got = reader.exactly(8192)
        assert got
    finally:
        sock.close()
    assert wait_until(lambda: early_upstream.open_connections() == 0, timeout=10), \
        "the upstream stream outlived its client"
    assert wait_until(lambda: any(line.endswith("client-gone")
                                  for line in access_lines(proxy, target))), proxy.log()[-3000:]
    assert wait_until(lambda: scrape(metrics_port).get(IN_FLIGHT) == 0)
    assert scrape(metrics_port).get(IN_USE) == 0


def test_pipelined_stream_ends_when_the_client_leaves(
        make_proxy: MakeProxy, early_upstream: EarlyStreamUpstream, rid: str) -> None:
    """A PUT with a body and two GETs written at once (pipelined); the PUT's answer is
    an endless stream; the client reads a little and closes. uvicorn told only its
    newest (queued) request that the client left, so the one streaming went on with
    nobody reading (found by the chaos harness on wsgi-uvicorn). The upstream
    connection closes within seconds and nothing stays in flight."""
    metrics_port = free_port()
    proxy = make_proxy("--metrics-bind", f"127.0.0.1:{metrics_port}",
                       upstream_url=early_upstream.url)
    target = f"/pipelined/{rid}"
    sock = connect(proxy.port, timeout=10)
    try:
        sock.sendall(f"PUT {target} HTTP/1.1\r\nHost: proxy.test\r\n"
                     "Content-Length: 900\r\n\r\n".encode() + b"p" * 900
                     + f"GET {target}/2 HTTP/1.1\r\nHost: proxy.test\r\n\r\n".encode()
                     + f"GET {target}/3 HTTP/1.1\r\nHost: proxy.test\r\n\r\n".encode())
        reader = Reader(sock)
        status, _, _, _ = read_head(reader)
        assert status == 200
        _, got = reader.exactly(8192)
        assert got
    finally:
        sock.close()
    assert wait_until(lambda: early_upstream.open_connections() == 0, timeout=10), \
        "the upstream stream outlived its pipelining client"
    assert wait_until(lambda: scrape(metrics_port).get(IN_FLIGHT) == 0)
    assert scrape(metrics_port).get(IN_USE) == 0


def test_upstream_cutting_a_body_is_one_warning(proxy: ProxyProcess, rid: str) -> None:
    """The upstream closes after 300 kB of 1 MB: the client connection is aborted and
    the proxy's log says so in exactly one WARNING line, with no ERROR line (uvicorn
    would add "ASGI callable returned without completing response")."""
    start = len(proxy.log())
    target = f"/cut/{rid}"
    with connect(proxy.port) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: proxy.test\r\n"
                     "x-upstream: cut size=1000000 after=300000\r\n\r\n".encode())
        cut = read_response(Reader(sock))
    assert cut.status == 200 and not cut.complete
    # A later request's access line: the cut request's lines are all written by then.
    after = f"/after-cut/{rid}"
    with proxy.client() as client:
        assert client.get(after).status_code == 200
    assert wait_until(lambda: access_lines(proxy, after))
    lines = proxy.log()[start:].splitlines()
    warnings = [line for line in lines if "WARNING" in line]
    assert len(warnings) == 1 and target in warnings[0], lines
    assert not [line for line in lines if "ERROR" in line], lines


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_stalled_upload_is_408_and_aborted_upstream(
        make_proxy: MakeProxy, upstream: Upstream, rid: str, chunked: bool) -> None:
    """--client-timeout 1: a client that sends 10 kB of its body and then nothing gets a
    408 problem answer, and the upstream request is aborted, never completed."""
    proxy = make_proxy("--client-timeout", "1")
    framing = "Transfer-Encoding: chunked" if chunked else "Content-Length: 100000"
    piece = b"u" * 10_000
    with connect(proxy.port, timeout=20) as sock:
        sock.sendall(f"POST /stall/{rid} HTTP/1.1\r\nHost: proxy.test\r\nx-req-id: {rid}\r\n"
                     f"{framing}\r\n\r\n".encode()
                     + (b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece))
        resp = read_response(Reader(sock), "POST")
    assert_problem(resp, 408)
    rec = upstream.wait_record(rid, complete=False)
    assert rec.aborted and not rec.complete, rec
    assert rec.body_length <= len(piece)
    assert proxy.alive()


def test_client_timeout_in_the_api_and_the_config_file(tmp_path: Path, upstream: Upstream
                                                       ) -> None:
    from dualproxy import AsyncProxy, SyncProxy
    from dualproxy.cli import load_config_file

    assert AsyncProxy(upstream.url, client_timeout=5).config.client_timeout == 5
    assert SyncProxy(upstream.url).config.client_timeout == 60  # nginx's default
    with pytest.raises(ValueError, match="client_timeout"):
        ProxyConfig(upstream.url, client_timeout=0)
    path = tmp_path / "routes.toml"
    path.write_text(f'[[route]]\nmount = "/a"\nupstream = "{upstream.url}"\n'
                    "client_timeout = 7.5\n")
    _, routes = load_config_file(str(path), ["serve", "--config", str(path)])
    assert routes[0]["client_timeout"] == 7.5


def test_a_probe_in_flight_at_close_starts_no_new_prober(upstream: Upstream) -> None:
    """close() lands while the health prober is sending (its thread, or its task whose
    cancellation the connect path swallowed): that probe must not make a new client,
    and with it a new prober that nothing will ever stop."""
    import asyncio

    from dualproxy import AsyncProxy, SyncProxy
    from dualproxy.health import probe_request

    sync = SyncProxy(upstream.url, health_path="/h", health_interval=30)
    _ = sync.client
    thread = sync._health
    assert thread is not None
    sync.close()
    thread._send(probe_request(sync.config, sync.config.upstreams[0])).close()
    assert sync._client is None and sync.balancer.prober is None
    sync.close()

    async def on_a_loop() -> None:
        proxy = AsyncProxy(upstream.url, health_path="/h", health_interval=30)
        _ = proxy.client
        task = proxy._health
        assert task is not None
        await proxy.aclose()
        response = await task._send(probe_request(proxy.config, proxy.config.upstreams[0]))
        await response.aclose()
        assert proxy._client is None and proxy.balancer.prober is None
        await proxy.aclose()

    asyncio.run(on_a_loop())
