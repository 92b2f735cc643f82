"""What the servers bound before the core sees a request: the head's size and time,
their own error answers, and the WebSocket tunnels a gthread worker holds.

Every pairing: a huge head is refused unread (414/431 problem+json) with the
server's memory flat, heads trickled by more clients than a gthread worker has
threads neither starve a plain GET nor stay open past `--header-timeout`, and
idle WebSockets on wsgi-gunicorn stop at `--ws-max-tunnels`.
"""

from __future__ import annotations

import json
import os
import select
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MakeProxy, ProxyProcess, TLSFiles, xfail_on_granian
from tests.rawhttp import (
    RawResponse,
    Reader,
    connect,
    exchange,
    read_head,
    read_response,
    wait_until,
)
from tests.test_websocket import ws_upstream  # noqa: F401 (fixture)
from tests.ws_upstream import WsUpstream

MiB = 1 << 20


def group_peak_rss(proxy: ProxyProcess) -> dict[int, int]:
    """VmHWM (peak resident set, KiB) of every process of the proxy's group."""
    peaks = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != proxy.proc.pid:
                continue
            status = (entry / "status").read_text()
        except (OSError, ProcessLookupError):
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                peaks[int(entry.name)] = int(line.split()[1])
    return peaks


def assert_problem(response: RawResponse, status: int) -> dict[str, object]:
    assert response.status == status, (response.status, response.body[:300])
    assert response.header("content-type") == "application/problem+json"
    doc = json.loads(response.body)
    assert doc["status"] == status
    return doc  # type: ignore[no-any-return]


def stream_head(port: int, first: bytes, unit: bytes, total: int
                ) -> tuple[int, RawResponse | None]:
    """Send `first`, then repeats of `unit` up to `total` bytes, never ending the head;
    stop as soon as an answer is readable or the connection is gone. The first MiB
    goes in 16 KiB pieces with a short look for the answer after each (a window of
    seconds for the server to answer), the rest in 256 KiB pieces.
    Returns the bytes sent and the answer (None: closed without one)."""
    with connect(port, timeout=30) as sock:
        sock.sendall(first)
        sent = len(first)
        while sent < total:
            small = sent < MiB
            readable, _, _ = select.select([sock], [], [], 0.05 if small else 0.005)
            if readable:
                break
            piece = unit * ((16 if small else 256) * 1024 // len(unit))
            try:
                sock.sendall(piece)
            except OSError:  # reset or broken pipe: refused
                break
            sent += len(piece)
        try:
            return sent, read_response(Reader(sock))
        except (OSError, ValueError, AttributeError):
            return sent, None


HEADS = {
    # many ordinary header lines
    "fields": (b"GET /fields HTTP/1.1\r\nHost: proxy.test\r\n",
               b"X-Fill: " + b"a" * 1014 + b"\r\n", 431),
    # one header whose value never ends
    "value": (b"GET /value HTTP/1.1\r\nHost: proxy.test\r\nX-Big: ", b"b" * 1024, 431),
    # a request line that never ends
    "line": (b"GET /", b"c" * 1024, 414),
}


@pytest.mark.parametrize("size", [1 * MiB, 20 * MiB], ids=["1MiB", "20MiB"])
@pytest.mark.parametrize("shape", list(HEADS))
def test_huge_head_is_refused_unread(proxy: ProxyProcess, shape: str, size: int,
                                    request: pytest.FixtureRequest) -> None:
    """Item 6: the server stops reading at HEAD_LIMIT and answers problem+json at once
    (it answered before the client sent it all), its memory flat."""
    xfail_on_granian(request, "head-answers")
    first, piece, status = HEADS[shape]
    before = group_peak_rss(proxy)
    sent, response = stream_head(proxy.port, first, piece, size)
    assert response is not None, f"closed without an answer after {sent} bytes"
    assert_problem(response, status)
    assert sent < size, f"the whole {size}-byte head was sent before any answer"
    after = group_peak_rss(proxy)
    grown = {pid: after[pid] - before.get(pid, after[pid]) for pid in after}
    # generous: a head costs the server at most HEAD_LIMIT and a read or two
    assert max(grown.values()) < 16 * 1024, f"peak RSS grew (KiB, by pid): {grown}"
    with proxy.client() as client:
        assert client.get("/after").status_code == 200


def test_head_at_the_limit_reaches_the_core(proxy: ProxyProcess) -> None:
    """A whole head under HEAD_LIMIT but past the core's 32768 bytes of fields gets the
    core's (or the server's) 431 problem, never a server's page; one just under passes."""
    small = exchange(proxy.port, b"GET /ok HTTP/1.1\r\nHost: proxy.test\r\nX-A: "
                     + b"a" * 30000 + b"\r\n\r\n")
    assert small.status == 200
    big = exchange(proxy.port, b"GET /big HTTP/1.1\r\nHost: proxy.test\r\nX-A: "
                   + b"a" * 20000 + b"\r\nX-B: " + b"b" * 20000 + b"\r\n\r\n")
    assert_problem(big, 431)


# --- item 18: the servers' own error answers ---

@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


SERVER_ERRORS = {
    "long-url": (b"GET /" + b"u" * 9000 + b" HTTP/1.1\r\nHost: proxy.test\r\n\r\n", 414),
    "bad-line": (b"GARBAGE\r\n\r\n", 400),
    "bad-version": (b"GET / HTTP/9.x\r\nHost: proxy.test\r\n\r\n", 400),
    "101-fields": (b"GET / HTTP/1.1\r\nHost: proxy.test\r\n"
                   + b"".join(b"X-%d: v\r\n" % n for n in range(101)) + b"\r\n", 431),
    "one-40k-field": (b"GET / HTTP/1.1\r\nHost: proxy.test\r\nX-A: " + b"a" * 40000
                      + b"\r\n\r\n", 431),
    # Past HEAD_LIMIT, under granian's read buffer (servers/granian.py READ_BUFFER):
    # granian hands it to the core, which refuses it as the other servers do.
    "200k-head": (b"GET / HTTP/1.1\r\nHost: proxy.test\r\n"
                  + b"".join(b"X-%d: %s\r\n" % (n, b"a" * 40000) for n in range(5))
                  + b"\r\n", 431),
}


@pytest.mark.parametrize("case", list(SERVER_ERRORS))
def test_server_errors_are_problem_json(proxy: ProxyProcess, case: str,
                                        request: pytest.FixtureRequest) -> None:
    """gunicorn's HTML error pages (414, 400, 431) and uvicorn's text/plain 400 are
    problem+json like every other answer."""
    xfail_on_granian(request, "head-answers", when=case in ("bad-line", "bad-version",
                                                             "101-fields"))
    raw, status = SERVER_ERRORS[case]
    assert_problem(exchange(proxy.port, raw, method="GET"), status)


def test_refused_clients_that_stay_freeze_nobody(proxy: ProxyProcess,
                                                 sockets: list[socket.socket],
                                                 request: pytest.FixtureRequest) -> None:
    """25 clients send a bad request line and keep the connection open: a GET still
    answers (gunicorn 27's gthread drained each for up to 2 s blocking its main loop,
    50 s here), and each gets its 400 problem and is then closed by the server."""
    xfail_on_granian(request, "head-answers")
    for _ in range(25):
        sock = connect(proxy.port, timeout=30)
        sock.sendall(b"GARBAGE\r\n\r\n")
        sockets.append(sock)
    with proxy.client() as client:
        assert client.get("/meanwhile").status_code == 200
    for sock in sockets:
        reader = Reader(sock)
        assert_problem(read_response(reader), 400)
        assert reader.rest() == b""  # then closed by the server


# --- item 7: slowloris ---

HEADER_TIMEOUT = 3


class Trickle:
    """Clients sending a head one byte at a time, never finishing it (`wrap`: TLS)."""

    def __init__(self, port: int, count: int,
                 wrap: Callable[[socket.socket], socket.socket] = lambda sock: sock) -> None:
        self.socks = [wrap(connect(port, timeout=5)) for _ in range(count)]
        self.answers: dict[int, bytes] = {}  # index -> what came back before the close
        self.stop = threading.Event()
        for sock in self.socks:
            sock.sendall(b"GET /slow HTTP/1.1\r\nHost: proxy.test\r\nX-Slow: ")
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set() and len(self.answers) < len(self.socks):
            for index, sock in enumerate(self.socks):
                if index in self.answers:
                    continue
                readable, _, _ = select.select([sock], [], [], 0)
                try:
                    if readable:
                        self.answers[index] = self._read_all(sock)
                        continue
                    sock.send(b"z")
                except OSError:
                    self.answers[index] = b""
            self.stop.wait(0.3)

    @staticmethod
    def _read_all(sock: socket.socket) -> bytes:
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except OSError:
            pass
        return data

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        for sock in self.socks:
            sock.close()


@pytest.fixture
def trickle_proxy(make_proxy: MakeProxy) -> ProxyProcess:
    return make_proxy("--header-timeout", str(HEADER_TIMEOUT), "--threads", "8")


def check_trickle(proxy: ProxyProcess, trickle: Trickle, **client: Any) -> None:
    """A plain GET answers while `trickle` runs, and each trickler is closed at
    --header-timeout with a 408 problem."""
    count = len(trickle.socks)
    with proxy.client(**client) as http:
        assert http.get("/during").status_code == 200
    assert wait_until(lambda: len(trickle.answers) == count, timeout=HEADER_TIMEOUT * 10), \
        f"{count - len(trickle.answers)} trickling connections still open"
    for answer in trickle.answers.values():
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:100]
        assert b"application/problem+json" in answer


def test_trickled_heads_starve_nobody_and_are_closed(trickle_proxy: ProxyProcess,
                                                     request: pytest.FixtureRequest) -> None:
    """Item 7: 40 clients trickling heads (five times the gthread worker's 8 threads):
    a plain GET still answers, and each trickler is closed at --header-timeout with
    a 408 problem; a connection that sent nothing is closed without a word."""
    xfail_on_granian(request, "head-timeout")
    idle = connect(trickle_proxy.port, timeout=5)
    trickle = Trickle(trickle_proxy.port, 40)
    try:
        check_trickle(trickle_proxy, trickle)
        idle.settimeout(HEADER_TIMEOUT * 10)
        assert idle.recv(100) == b""
    finally:
        trickle.close()
        idle.close()


def test_trickled_heads_over_tls(make_proxy: MakeProxy, tls_files: TLSFiles,
                                 request: pytest.FixtureRequest) -> None:
    """The same over TLS the proxy serves itself: on gunicorn the handshake and the head
    are read by the worker's main loop too. (A client that never starts its handshake
    meets uvicorn's asyncio ssl_handshake_timeout, 60 s, not --header-timeout.)"""
    xfail_on_granian(request, "head-timeout")
    proxy = make_proxy("--header-timeout", str(HEADER_TIMEOUT), "--threads", "8",
                       "--certfile", tls_files.server_cert, "--keyfile", tls_files.server_key)
    context = tls_files.client_context()
    trickle = Trickle(proxy.port, 40,
                      lambda sock: context.wrap_socket(sock, server_hostname="127.0.0.1"))
    try:
        check_trickle(proxy, trickle, verify=context)
    finally:
        trickle.close()


# --- item 8: idle WebSockets and gthread's threads ---

@pytest.fixture
def ws_threads_proxy(make_proxy: MakeProxy, ws_upstream: WsUpstream  # noqa: F811
                     ) -> ProxyProcess:
    return make_proxy("--threads", "4", upstream_url=ws_upstream.url)


def open_ws_raw(proxy: ProxyProcess) -> tuple[socket.socket, RawResponse]:
    sock = connect(proxy.port, timeout=10)
    sock.sendall(b"GET /echo HTTP/1.1\r\nHost: proxy.test\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 b"Sec-WebSocket-Version: 13\r\n\r\n")
    reader = Reader(sock)
    status, reason, headers, _ = read_head(reader)
    body = b""
    if status != 101:
        lengths = [int(v) for k, v in headers if k.lower() == "content-length"]
        body, _ = reader.exactly(lengths[0])
    return sock, RawResponse(status, reason, headers, body, "content-length", True)


def test_idle_websockets_leave_threads_for_http(ws_threads_proxy: ProxyProcess,
                                                 sockets: list[socket.socket]) -> None:
    """Item 8: `--threads 4` keeps one thread for HTTP (the default cap is 3 tunnels).
    On wsgi-gunicorn, where a tunnel holds a thread, the fourth idle WebSocket gets
    503 problem+json with Retry-After and a slot comes back when a tunnel closes; the
    other pairings hold no thread per socket and accept it. A GET answers either way."""
    for _ in range(3):
        sock, head = open_ws_raw(ws_threads_proxy)
        sockets.append(sock)
        assert head.status == 101
    sock, head = open_ws_raw(ws_threads_proxy)
    sockets.append(sock)
    if ws_threads_proxy.pairing == "wsgi-gunicorn":
        assert_problem(head, 503)
        assert head.header("retry-after") == "5"
    else:
        assert head.status == 101
    with ws_threads_proxy.client() as client:
        assert client.get("/plain").status_code == 200
    sockets.pop(0).close()  # a tunnel ends: its slot is free again

    def accepted() -> bool:
        sock, head = open_ws_raw(ws_threads_proxy)
        sockets.append(sock)
        return head.status == 101

    assert wait_until(accepted, timeout=10, interval=0.2)

