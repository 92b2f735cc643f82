"""Unit tests of dualproxy's HTTP/1.1 transports against scripted raw-socket upstreams.

Not pairing-parametrized: every test runs against the sync transport and the
async one on both event loops uvicorn uses (asyncio and uvloop). The upstream
is a tiny loopback server whose per-connection script reads requests and
writes exact bytes, so framing, reuse and abort rules are seen on the wire.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gzip
import select
import socket
import ssl
import struct
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import uvloop

from dualproxy.errors import BodyTooLarge, ClientDisconnected
from dualproxy.http1 import CLIENT_WATCH, AsyncUpstreamTransport, ClientWatch, UpstreamTransport
from dualproxy.http1.aio import HIGH_WATER
from dualproxy.http1.pool import Call
from tests.rawhttp import Reader, wait_until

KINDS = ("sync", "asyncio", "uvloop")
ASYNC_KINDS = ("asyncio", "uvloop")
WAIT = 10.0  # generous bound for "this eventually happens" on a loaded machine
Body = Sequence["bytes | BaseException | Callable[[], None]"]


class Stall(Exception):
    """In an async request body: wait forever here (until cancelled)."""


# ---------------------------------------------------------------------------- upstream side


@dataclass
class Seen:
    """One request as the upstream read it."""

    head: bytes
    body: bytes
    complete: bool

    @property
    def request_line(self) -> bytes:
        return self.head.split(b"\r\n", 1)[0]


class Peer(Reader):
    """The upstream's end of one connection, with everything it ever read."""

    def __init__(self, sock: socket.socket, index: int) -> None:
        super().__init__(sock)
        self.index = index
        self.received = bytearray()
        self.requests: list[Seen] = []
        self.done = threading.Event()

    def _fill(self) -> bool:
        before = len(self.buf)
        try:
            filled = super()._fill()
        except OSError:  # closed under us by the test, or a timeout: same as EOF here
            self.eof = True
            filled = False
        if not filled:
            return False
        self.received += self.buf[before:]
        return True

    def read_head(self) -> bytes | None:
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                return None
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        return head + b"\r\n\r\n"

    def read_request(self) -> Seen | None:
        """Read one request (head and framed body); None at EOF before a head."""
        head = self.read_head()
        if head is None:
            return None
        lower = head.lower()
        body, complete = b"", True
        if b"\r\ntransfer-encoding: chunked\r\n" in lower:
            pieces, complete = [], False
            while True:
                line = self.line()
                if line is None:
                    break
                size = int(line.split(b";")[0], 16)
                if size == 0:
                    while (trailer := self.line()) not in (None, b""):
                        pass
                    complete = trailer == b""
                    break
                data, ok = self.exactly(size + 2)
                pieces.append(data[:size])
                if not ok:
                    break
            body = b"".join(pieces)
        elif b"\r\ncontent-length:" in lower:
            length = int(lower.split(b"\r\ncontent-length:")[1].split(b"\r\n")[0])
            body, complete = self.exactly(length)
        seen = Seen(head, body, complete)
        self.requests.append(seen)
        return seen

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            pass

    def closed_within(self, seconds: float) -> bool:
        """Wait up to `seconds` for the client to close (reading what it sends meanwhile)."""
        deadline = time.monotonic() + seconds
        while not self.eof and (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([self.sock], [], [], left)
            if readable:
                self._fill()
        return self.eof

    def wait_eof(self) -> None:
        """Read (and keep) whatever comes until the client closes."""
        self.sock.settimeout(WAIT * 3)
        while self._fill():
            pass

    def reset(self) -> None:
        """Close with a TCP reset instead of a FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


Script = Callable[[Peer], None]


class Upstream:
    """A loopback server running `script(peer)` in a thread for every connection."""

    def __init__(self, script: Script, tls: ssl.SSLContext | None = None) -> None:
        self.script = script
        self.tls = tls
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = self.listener.getsockname()[1]
        self.peers: list[Peer] = []
        self.threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept_loop, daemon=True)
        self._accepting.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            peer = Peer(sock, len(self.peers))
            self.peers.append(peer)
            thread = threading.Thread(target=self._run, args=(peer,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _run(self, peer: Peer) -> None:
        try:
            if self.tls is not None:
                peer.sock = self.tls.wrap_socket(peer.sock, server_side=True)
            peer.sock.settimeout(WAIT * 3)
            self.script(peer)
        except (OSError, ssl.SSLError):
            pass
        finally:
            peer.sock.close()
            peer.done.set()

    def finished(self, index: int) -> Peer:
        """The index-th connection, once its script has finished (the socket is closed)."""
        deadline = time.monotonic() + WAIT
        while len(self.peers) <= index and time.monotonic() < deadline:
            time.sleep(0.01)
        peer = self.peers[index]
        assert peer.done.wait(WAIT), "the upstream connection is still open"
        return peer

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        self._accepting.join(WAIT)
        for peer in self.peers:
            try:
                peer.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self.threads:
            thread.join(WAIT)


def response(body: bytes = b"ok", *headers: bytes, status: bytes = b"200 OK") -> bytes:
    lines = [b"HTTP/1.1 " + status, *headers, b"Content-Length: %d" % len(body)]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def answer(*responses: bytes, close: bool = False) -> Script:
    """Answer the requests on each connection with `responses` in turn (the last repeats)."""

    def script(peer: Peer) -> None:
        index = 0
        while peer.read_request() is not None:
            peer.send(responses[min(index, len(responses) - 1)])
            index += 1
            if close:
                return

    return script


def hang(peer: Peer) -> None:
    """Read the request, never answer, keep reading until the client closes."""
    peer.read_head()
    peer.wait_eof()


# ---------------------------------------------------------------------------- client side


class Driver:
    """One transport and a synchronous way to use it, whatever its kind."""

    def __init__(self, kind: str, **options: Any) -> None:
        self.kind = kind
        self.sync: UpstreamTransport | None = None
        self.async_: AsyncUpstreamTransport | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        if kind == "sync":
            self.sync = UpstreamTransport(**options)
        else:
            self.async_ = AsyncUpstreamTransport(**options)
            self.loop = uvloop.new_event_loop() if kind == "uvloop" else asyncio.new_event_loop()
            self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
            self._thread.start()

    def submit(self, coro: Any) -> concurrent.futures.Future[Any]:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Any) -> Any:
        return self.submit(coro).result(WAIT * 3)

    def request(
        self,
        url: str,
        method: str = "GET",
        headers: Sequence[tuple[bytes, bytes]] = (),
        body: Body | None = None,
        target: bytes | None = None,
        timeout: dict[str, float | None] | None = None,
    ) -> httpx.Request:
        """A request with exactly these headers, as the core builds it."""
        content: Any = None
        if body is not None:
            content = _sync_body(body) if self.kind == "sync" else _async_body(body)
        extensions: dict[str, Any] = {"timeout": {"connect": 5.0, "read": 5.0, "write": 5.0,
                                                  "pool": 5.0, **(timeout or {})}}
        if target is not None:
            extensions["target"] = target
        request = httpx.Request(method, url, content=content, extensions=extensions)
        request.headers = httpx.Headers(list(headers) or [(b"Host", b"upstream.test")])
        return request

    def send(self, request: httpx.Request) -> Resp:
        if self.sync is not None:
            return Resp(self, self.sync.handle_request(request))
        assert self.async_ is not None
        return Resp(self, self.run(self.async_.handle_async_request(request)))

    def fetch(self, url: str, **kwargs: Any) -> tuple[Resp, bytes]:
        resp = self.send(self.request(url, **kwargs))
        try:
            return resp, resp.read()
        finally:
            resp.close()

    def close(self) -> None:
        if self.sync is not None:
            self.sync.close()
            return
        assert self.async_ is not None and self.loop is not None
        self.run(self.async_.aclose())
        self.run(self.loop.shutdown_asyncgens())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(WAIT)
        self.loop.close()


def _sync_body(body: Body) -> Iterator[bytes]:
    for item in body:
        if isinstance(item, BaseException):
            raise item
        if callable(item):
            item()
            continue
        yield item


async def _async_body(body: Body) -> AsyncIterator[bytes]:
    for item in body:
        if isinstance(item, Stall):
            await asyncio.Event().wait()
        if isinstance(item, BaseException):
            raise item
        if callable(item):
            await asyncio.get_running_loop().run_in_executor(None, item)
            continue
        yield item


class Resp:
    """A response of either kind, read chunk by chunk from the test's thread."""

    def __init__(self, driver: Driver, response: httpx.Response) -> None:
        self.driver = driver
        self.response = response
        self.status = response.status_code
        self.headers = response.headers.raw
        self.closed = False
        self._sync_it = response.iter_raw() if driver.kind == "sync" else None
        self._async_it = response.aiter_raw() if driver.kind != "sync" else None

    def next_chunk(self) -> bytes | None:
        if self._sync_it is not None:
            return next(self._sync_it, None)
        assert self._async_it is not None
        return self.driver.run(_anext_or_none(self._async_it))  # type: ignore[no-any-return]

    def chunks(self) -> list[bytes]:
        out = []
        while (chunk := self.next_chunk()) is not None:
            out.append(chunk)
        return out

    def read(self) -> bytes:
        return b"".join(self.chunks())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._sync_it is not None:
            self._sync_it.close()
            self.response.close()
            return
        assert self._async_it is not None
        self.driver.run(_aclose(self._async_it, self.response))


async def _anext_or_none(it: AsyncIterator[bytes]) -> bytes | None:
    try:
        return await it.__anext__()
    except StopAsyncIteration:
        return None


async def _aclose(it: Any, response: httpx.Response) -> None:
    await it.aclose()
    await response.aclose()


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_driver(kind: str) -> Iterator[Callable[..., Driver]]:
    drivers: list[Driver] = []

    def make(**options: Any) -> Driver:
        driver = Driver(kind, **options)
        drivers.append(driver)
        return driver

    yield make
    for driver in drivers:
        driver.close()


@pytest.fixture
def driver(make_driver: Callable[..., Driver]) -> Driver:
    return make_driver()


@pytest.fixture
def serve() -> Iterator[Callable[..., Upstream]]:
    servers: list[Upstream] = []

    def start(script: Script, tls: ssl.SSLContext | None = None) -> Upstream:
        server = Upstream(script, tls)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------------------- request side


def test_request_line_and_headers_sent_exactly(driver: Driver, serve: Any) -> None:
    up = serve(answer(response()))
    headers = [(b"Host", b"upstream.test"), (b"X-Dup", b"1"), (b"x-dup", b"2"),
               (b"aCCept", b"*/*")]
    resp, body = driver.fetch(up.url, headers=headers, target=b"/a/../b%2F/./c?x&y=%41&&")
    assert (resp.status, body) == (200, b"ok")
    assert up.peers[0].received == (b"GET /a/../b%2F/./c?x&y=%41&& HTTP/1.1\r\n"
                                   b"Host: upstream.test\r\nX-Dup: 1\r\nx-dup: 2\r\n"
                                   b"aCCept: */*\r\n\r\n")


def test_request_line_falls_back_to_raw_path(driver: Driver, serve: Any) -> None:
    up = serve(answer(response()))
    request = driver.request(up.url + "/p%2Fq?a&b=", method="DELETE")
    resp = driver.send(request)
    assert resp.read() == b"ok"
    resp.close()
    assert up.peers[0].requests[0].request_line == b"DELETE " + request.url.raw_path + b" HTTP/1.1"
    assert request.url.raw_path.startswith(b"/p%2Fq?a&b=")


def test_content_length_body_sent_raw(driver: Driver, serve: Any) -> None:
    up = serve(answer(response()))
    headers = [(b"Host", b"u"), (b"Content-Length", b"11")]
    resp, body = driver.fetch(up.url, method="POST", headers=headers,
                              body=[b"hello ", b"", b"world"])
    assert body == b"ok"
    seen = up.peers[0].requests[0]
    assert seen.body == b"hello world" and seen.complete
    assert up.peers[0].received == (b"POST / HTTP/1.1\r\nHost: u\r\nContent-Length: 11\r\n\r\n"
                                   b"hello world")


def test_chunked_body_encoded_with_final_chunk(driver: Driver, serve: Any) -> None:
    up = serve(answer(response()))
    headers = [(b"Host", b"u"), (b"Transfer-Encoding", b"chunked")]
    resp, body = driver.fetch(up.url, method="PUT", headers=headers,
                              body=[b"abc", b"", b"0123456789abcdefX"])
    assert body == b"ok"
    assert up.peers[0].received.endswith(
        b"\r\n\r\n3\r\nabc\r\n11\r\n0123456789abcdefX\r\n0\r\n\r\n")


def test_no_framing_header_sends_no_body(driver: Driver, serve: Any) -> None:
    up = serve(answer(response()))
    resp, body = driver.fetch(up.url, method="POST", headers=[(b"Host", b"u")])
    assert body == b"ok"
    assert up.peers[0].received == b"POST / HTTP/1.1\r\nHost: u\r\n\r\n"


@pytest.mark.parametrize("pieces", [[b"abc", b"def"], [b"ab"]], ids=["longer", "shorter"])
def test_body_not_matching_content_length_is_never_completed(
        driver: Driver, serve: Any, pieces: list[bytes]) -> None:
    up = serve(hang)
    headers = [(b"Host", b"u"), (b"Content-Length", b"4")]
    with pytest.raises(httpx.LocalProtocolError):
        driver.fetch(up.url, method="POST", headers=headers, body=pieces)
    received = bytes(up.finished(0).received)
    assert len(received.partition(b"\r\n\r\n")[2]) < 4


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("error", [ClientDisconnected("client gone"), BodyTooLarge("big")],
                         ids=["disconnected", "too-large"])
def test_body_iterator_error_propagates_and_upload_stays_cut(
        driver: Driver, serve: Any, framing: str, error: Exception) -> None:
    up = serve(hang)
    frame = ((b"Content-Length", b"100") if framing == "content-length"
             else (b"Transfer-Encoding", b"chunked"))
    with pytest.raises(type(error)) as info:
        driver.fetch(up.url, method="POST", headers=[(b"Host", b"u"), frame],
                     body=[b"first", b"second", error])
    assert info.value is error
    peer = up.finished(0)  # the script ended: the transport closed the connection
    body = bytes(peer.received).partition(b"\r\n\r\n")[2]
    if framing == "chunked":
        assert body == b"5\r\nfirst\r\n6\r\nsecond\r\n"
    else:
        assert body == b"firstsecond"


def test_early_answer_during_upload_is_returned(driver: Driver, serve: Any) -> None:
    """The upstream refuses a big upload after its head and closes: its answer wins."""

    def refuse(peer: Peer) -> None:
        peer.read_head()
        peer.send(response(b"too large", b"Connection: close", status=b"413 Payload Too Large"))
        peer.reset()

    up = serve(refuse)
    piece = b"x" * 65536
    count = 1024  # 64 MiB: far more than every socket buffer on the way
    yielded = []
    body: list[Any] = []
    for _ in range(count):
        body += [lambda: yielded.append(1), piece]
    headers = [(b"Host", b"u"), (b"Content-Length", b"%d" % (count * len(piece)))]
    resp, data = driver.fetch(up.url, method="POST", headers=headers, body=body)
    assert (resp.status, data) == (413, b"too large")
    assert len(yielded) < count  # sending stopped


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("answer_body", [b"no", b""], ids=["with-body", "empty"])
def test_early_answer_without_close_is_returned_and_not_reused(
        driver: Driver, serve: Any, framing: str, answer_body: bytes) -> None:
    answered = threading.Event()

    def refuse_then_drain(peer: Peer) -> None:
        if peer.index == 0:
            peer.read_head()
            peer.send(response(answer_body, status=b"401 Unauthorized"))
            answered.set()
            peer.wait_eof()
        else:
            answer(response(b"fresh"))(peer)

    up = serve(refuse_then_drain)
    frame = ((b"Content-Length", b"%d" % (64 * 65536)) if framing == "content-length"
             else (b"Transfer-Encoding", b"chunked"))
    body: list[Any] = [b"x" * 65536, lambda: answered.wait(WAIT), lambda: time.sleep(0.2)]
    body += [b"y" * 65536] * 63
    resp, data = driver.fetch(up.url, method="POST", headers=[(b"Host", b"u"), frame],
                              body=body)
    assert (resp.status, data) == (401, answer_body)
    _, data = driver.fetch(up.url)
    assert data == b"fresh"
    assert len(up.peers) == 2


# ---------------------------------------------------------------------------- response side


def test_response_head_kept_raw(driver: Driver, serve: Any) -> None:
    raw = (b"HTTP/1.1 201 Created Here\r\nX-Case: A\r\nset-cookie: a=1\r\n"
           b"Set-Cookie: b=2\r\nContent-Length: 0\r\n\r\n")
    up = serve(answer(raw))
    resp, body = driver.fetch(up.url)
    assert resp.status == 201 and body == b""
    assert resp.headers == [(b"X-Case", b"A"), (b"set-cookie", b"a=1"), (b"Set-Cookie", b"b=2"),
                            (b"Content-Length", b"0")]
    assert resp.response.extensions["http_version"] == b"HTTP/1.1"
    assert resp.response.extensions["reason_phrase"] == b"Created Here"


def test_body_is_never_decompressed(driver: Driver, serve: Any) -> None:
    packed = gzip.compress(b"hello " * 1000)
    up = serve(answer(response(packed, b"Content-Encoding: gzip")))
    _, body = driver.fetch(up.url, headers=[(b"Host", b"u"), (b"Accept-Encoding", b"gzip")])
    assert body == packed


CHUNKED = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5;name=value\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n")
FRAMINGS = {
    "content-length": (response(b"hello"), b"hello", True),
    "chunked-ext-trailers": (CHUNKED, b"hello0123456789", True),
    "length-repeated-equal": (response(b"abcde", b"Content-Length: 5"), b"abcde", True),
    "http10-keep-alive": (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2"
                          b"\r\n\r\nok", b"ok", True),
    "http10": (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", b"ok", False),
    "connection-close": (response(b"bye", b"Connection: close"), b"bye", False),
    "close-delimited": (b"HTTP/1.1 200 OK\r\n\r\nuntil the end", b"until the end", False),
    "chunked-capitalised": (CHUNKED.replace(b"chunked", b" Chunked"), b"hello0123456789", True),
}


@pytest.mark.parametrize("name", list(FRAMINGS))
def test_response_framing_and_reuse(driver: Driver, serve: Any, name: str) -> None:
    raw, expected, reused = FRAMINGS[name]
    up = serve(answer(raw, close=name == "close-delimited"))
    for _ in range(3):
        resp, body = driver.fetch(up.url)
        assert (resp.status, body) == (200, expected)
    assert len(up.peers) == (1 if reused else 3)


@pytest.mark.parametrize("framing", [
    b"Content-Length: 5\r\nTransfer-Encoding: chunked",
    b"Transfer-Encoding:\r\nContent-Length: 5",
    b"Transfer-Encoding: gzip, chunked",
    b"Transfer-Encoding: chunked, chunked",
    b"Transfer-Encoding: chunked,",
], ids=["both", "empty-coding-and-length", "gzip", "chunked-twice", "empty-item"])
def test_ambiguous_framing_is_a_protocol_error_and_never_reused(
        driver: Driver, serve: Any, framing: bytes) -> None:
    raw = b"HTTP/1.1 200 OK\r\n" + framing + b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    up = serve(lambda peer: answer(response(b"next") if peer.index else raw)(peer))
    with pytest.raises(httpx.RemoteProtocolError):
        driver.fetch(up.url)
    assert up.finished(0).eof  # closed, not pooled
    assert driver.fetch(up.url)[1] == b"next"
    assert len(up.peers) == 2


def test_request_connection_close_is_not_reused(driver: Driver, serve: Any) -> None:
    up = serve(answer(response()))
    for _ in range(2):
        _, body = driver.fetch(up.url, headers=[(b"Host", b"u"), (b"Connection", b"close")])
        assert body == b"ok"
    assert len(up.peers) == 2


@pytest.mark.parametrize("raw", [
    response(b"ok") + b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsmuggl",
    CHUNKED + b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsmuggl",
], ids=["after-length", "after-chunked"])
def test_bytes_beyond_the_body_discard_the_connection(
        driver: Driver, serve: Any, raw: bytes) -> None:
    up = serve(answer(raw))
    first = driver.fetch(up.url)[1]
    for _ in range(2):
        assert driver.fetch(up.url)[1] == first
    assert len(up.peers) == 3


@pytest.mark.parametrize("framing", [b"Content-Length: 10", b"Connection: close"])
def test_body_in_separate_reads(driver: Driver, serve: Any, framing: bytes) -> None:
    """A body that arrives read by read (the async transport passes whole reads on)."""

    def script(peer: Peer) -> None:
        peer.read_request()
        peer.send(b"HTTP/1.1 200 OK\r\n" + framing + b"\r\n\r\n")
        for piece in (b"hel", b"lo", b"world"):
            time.sleep(0.05)
            peer.send(piece)
        if b"close" in framing:
            return
        peer.wait_eof()

    up = serve(script)
    assert driver.fetch(up.url)[1] == b"helloworld"


def test_stray_bytes_after_a_body_in_separate_reads(driver: Driver, serve: Any) -> None:
    def script(peer: Peer) -> None:
        if peer.index:
            answer(response(b"second"))(peer)
            return
        peer.read_request()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
        time.sleep(0.05)
        peer.send(b"hello")
        time.sleep(0.05)
        peer.send(b"world" + response(b"smuggl"))
        answer(response(b"wrong"))(peer)

    up = serve(script)
    assert driver.fetch(up.url)[1] == b"helloworld"
    assert driver.fetch(up.url)[1] == b"second"
    assert len(up.peers) == 2


def test_bytes_on_an_idle_connection_discard_it(driver: Driver, serve: Any) -> None:
    stray_sent = threading.Event()

    def stray(peer: Peer) -> None:
        peer.read_request()
        peer.send(response(b"first"))
        time.sleep(0.1)
        peer.send(response(b"stray"))
        stray_sent.set()
        answer(response(b"wrong"))(peer)

    def script(peer: Peer) -> None:
        (stray if peer.index == 0 else answer(response(b"second")))(peer)

    up = serve(script)
    assert driver.fetch(up.url)[1] == b"first"
    assert stray_sent.wait(WAIT)
    time.sleep(0.3)  # let the stray bytes reach the client's buffer
    assert driver.fetch(up.url)[1] == b"second"
    assert len(up.peers) == 2


def test_idle_connection_closed_by_upstream_is_replaced(driver: Driver, serve: Any) -> None:
    up = serve(answer(response(), close=True))
    assert driver.fetch(up.url)[1] == b"ok"
    up.finished(0)
    time.sleep(0.2)  # let the FIN arrive
    assert driver.fetch(up.url)[1] == b"ok"
    assert len(up.peers) == 2


def test_interim_responses_are_skipped(driver: Driver, serve: Any) -> None:
    raw = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload"
           b"\r\n\r\n" + response(b"final", b"X-Final: 1"))
    up = serve(answer(raw))
    resp, body = driver.fetch(up.url)
    assert (resp.status, body) == (200, b"final")
    assert resp.headers == [(b"X-Final", b"1"), (b"Content-Length", b"5")]


def test_switching_protocols_is_returned_and_never_reused(driver: Driver, serve: Any) -> None:
    raw = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n"
    up = serve(answer(raw))
    for _ in range(2):
        resp, body = driver.fetch(up.url)
        assert (resp.status, body) == (101, b"")
    assert len(up.peers) == 2


@pytest.mark.parametrize(("method", "raw"), [
    ("HEAD", response(b"").replace(b"Content-Length: 0", b"Content-Length: 1000")),
    ("GET", b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n"),
    ("GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 1000\r\nETag: \"x\"\r\n\r\n"),
], ids=["head", "204", "304"])
def test_bodiless_responses_read_no_body_and_reuse(
        driver: Driver, serve: Any, method: str, raw: bytes) -> None:
    up = serve(answer(raw))
    for _ in range(3):
        resp, body = driver.fetch(up.url, method=method)
        assert body == b""
    assert len(up.peers) == 1


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 2OO OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/2 200\r\nContent-Length: 0\r\n\r\n",
    b"hello there\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nNo colon here\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nBad Name: x\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello!",
    b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nContent-Length: 0x5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
], ids=["status-digits", "version", "no-status-line", "no-colon", "space-in-name",
        "lengths-differ", "length-list-differs", "length-sign", "length-hex",
        "chunk-size-not-hex", "chunk-size-negative", "chunk-without-crlf"])
def test_malformed_responses_are_protocol_errors(driver: Driver, serve: Any, raw: bytes) -> None:
    up = serve(answer(raw))
    with pytest.raises(httpx.RemoteProtocolError):
        driver.fetch(up.url)


@pytest.mark.parametrize("raw", [
    b"",
    b"HTTP/1.1 200 OK\r\nContent-Le",
    response(b"0123456789")[:-4],
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
], ids=["nothing", "in-head", "short-length-body", "chunked-without-end"])
@pytest.mark.parametrize("how", ["close", "reset"])
def test_upstream_gone_mid_response(driver: Driver, serve: Any, raw: bytes, how: str) -> None:
    def script(peer: Peer) -> None:
        peer.read_request()
        peer.send(raw)
        time.sleep(0.1)
        if how == "reset":
            peer.reset()

    up = serve(script)
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        driver.fetch(up.url)


def test_body_flows_as_it_arrives(driver: Driver, serve: Any) -> None:
    release = threading.Event()

    def trickle(peer: Peer) -> None:
        peer.read_request()
        peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        release.wait(WAIT)
        peer.send(b"4\r\nrest\r\n0\r\n\r\n")
        peer.wait_eof()

    up = serve(trickle)
    resp = driver.send(driver.request(up.url))
    assert resp.next_chunk() == b"first"
    assert not release.is_set()
    release.set()
    assert resp.read() == b"rest"
    resp.close()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_big_body_in_bounded_chunks(driver: Driver, serve: Any, chunked: bool) -> None:
    data = bytes(range(256)) * 16384  # 4 MiB
    if chunked:
        raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"".join(
            b"%x\r\n%b\r\n" % (len(piece), piece)
            for piece in (data[i:i + 100000] for i in range(0, len(data), 100000))
        ) + b"0\r\n\r\n"
    else:
        raw = response(data)
    up = serve(answer(raw))
    resp = driver.send(driver.request(up.url))
    chunks = resp.chunks()
    resp.close()
    assert b"".join(chunks) == data
    assert max(len(c) for c in chunks) <= 262144


def test_slow_reader_applies_backpressure(driver: Driver, serve: Any) -> None:
    total = 256 * 1048576
    sent = [0]
    finished = threading.Event()

    def flood(peer: Peer) -> None:
        peer.read_request()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        piece = b"z" * 65536
        while sent[0] < total:
            peer.sock.sendall(piece)
            sent[0] += len(piece)
        finished.set()

    up = serve(flood)
    resp = driver.send(driver.request(up.url))
    assert resp.next_chunk()
    # Loopback moves GB/s: without backpressure the whole body would be sent by now.
    assert not finished.wait(1.0)
    assert sent[0] < total // 4
    resp.close()
    up.finished(0)


# ---------------------------------------------------------------------------- failures and timeouts


def test_refused_is_connect_error(driver: Driver) -> None:
    with pytest.raises(httpx.ConnectError):
        driver.fetch(f"http://127.0.0.1:{closed_port()}/")


def test_connect_timeout(driver: Driver) -> None:
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    fillers: list[socket.socket] = []
    try:
        # Fill the accept queue so that the next SYN is dropped (connect hangs).
        while len(fillers) < 16:
            sock = socket.socket()
            fillers.append(sock)
            sock.settimeout(0.3)
            try:
                sock.connect(listener.getsockname())
            except TimeoutError:
                break
        with pytest.raises(httpx.ConnectTimeout):
            driver.fetch(f"http://127.0.0.1:{listener.getsockname()[1]}/",
                         timeout={"connect": 0.3})
    finally:
        for sock in fillers:
            sock.close()
        listener.close()


def test_read_timeout_before_head(driver: Driver, serve: Any) -> None:
    up = serve(hang)
    with pytest.raises(httpx.ReadTimeout):
        driver.fetch(up.url, timeout={"read": 0.3})
    up.finished(0)  # and the connection was closed


def pause_then_body(pause: float) -> Script:
    """Answer each request with its head at once and its body after `pause`."""

    def script(peer: Peer) -> None:
        while peer.read_request() is not None:
            peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n")
            if peer.closed_within(pause):
                return
            peer.send(b"body")

    return script


def test_read_timeout_is_looked_up_at_every_read(driver: Driver, serve: Any) -> None:
    """The core raises the read timeout once the head is in (idle timeout)."""
    up = serve(pause_then_body(1.0))
    request = driver.request(up.url, timeout={"read": 0.4})
    resp = driver.send(request)
    request.extensions["timeout"]["read"] = 10.0
    assert resp.read() == b"body"
    resp.close()


def test_read_timeout_mid_body(driver: Driver, serve: Any) -> None:
    up = serve(pause_then_body(3.0))
    resp = driver.send(driver.request(up.url, timeout={"read": 0.3}))
    with pytest.raises(httpx.ReadTimeout):
        resp.read()
    resp.close()
    up.finished(0)


def test_write_timeout(driver: Driver, serve: Any) -> None:
    up = serve(lambda peer: time.sleep(1.5))  # never reads
    piece = b"w" * 1048576
    headers = [(b"Host", b"u"), (b"Content-Length", b"%d" % (256 * len(piece)))]
    with pytest.raises(httpx.WriteTimeout):
        driver.fetch(up.url, method="PUT", headers=headers, body=[piece] * 256,
                     timeout={"write": 0.3})


def test_pool_timeout_and_slot_freed_by_close(make_driver: Callable[..., Driver],
                                              serve: Any) -> None:
    driver = make_driver(max_connections=1)
    slow = serve(pause_then_body(WAIT))
    fast = serve(answer(response(b"fast")))
    held = driver.send(driver.request(slow.url))
    with pytest.raises(httpx.PoolTimeout):
        driver.fetch(fast.url, timeout={"pool": 0.3})
    held.close()  # abandoned mid-body: the connection closes, the slot frees
    assert slow.finished(0).eof
    assert driver.fetch(fast.url, timeout={"pool": 1.0})[1] == b"fast"


def test_slot_waiter_gets_a_freed_slot(make_driver: Callable[..., Driver], serve: Any) -> None:
    driver = make_driver(max_connections=1)
    up = serve(pause_then_body(0.5))
    held = driver.send(driver.request(up.url))
    if driver.kind == "sync":
        pool = concurrent.futures.ThreadPoolExecutor(1)
        waiting = pool.submit(driver.fetch, up.url, timeout={"pool": WAIT})
    else:
        assert driver.async_ is not None
        waiting = driver.submit(driver.async_.handle_async_request(
            driver.request(up.url, timeout={"pool": WAIT})))
    time.sleep(0.2)
    assert not waiting.done()
    assert held.read() == b"body"
    held.close()
    result = waiting.result(WAIT)
    if driver.kind == "sync":
        pool.shutdown()
        assert result[1] == b"body"
    else:
        resp = Resp(driver, result)
        assert resp.read() == b"body"
        resp.close()
    assert len(up.peers) == 1  # the freed connection was reused


def test_keepalive_limit(make_driver: Callable[..., Driver], serve: Any) -> None:
    driver = make_driver(max_keepalive_connections=0)
    up = serve(answer(response()))
    for _ in range(2):
        assert driver.fetch(up.url)[1] == b"ok"
    assert len(up.peers) == 2


def test_no_limits(make_driver: Callable[..., Driver], serve: Any) -> None:
    """None means unlimited, as in httpx.Limits."""
    driver = make_driver(max_connections=None, max_keepalive_connections=None)
    up = serve(pause_then_body(0.2))
    held = [driver.send(driver.request(up.url)) for _ in range(3)]
    for resp in held:
        assert resp.read() == b"body"
        resp.close()
    assert driver.fetch(up.url)[1] == b"body"
    assert len(up.peers) == 3


def test_connections_back_after_close_are_closed(driver: Driver, serve: Any) -> None:
    """close()/aclose() closes the idle connections and every one that comes back later."""
    up = serve(answer(response(b"idle"), response(b"busy")))
    idle_up = serve(answer(response(b"idle")))
    assert driver.fetch(idle_up.url)[1] == b"idle"  # pooled, idle at close time
    held = driver.send(driver.request(up.url))      # checked out at close time
    if driver.sync is not None:
        driver.sync.close()
    else:
        assert driver.async_ is not None
        driver.run(driver.async_.aclose())
    assert idle_up.finished(0).eof
    assert held.read() == b"idle"
    held.close()
    assert up.finished(0).eof, "a connection checked in after close() was kept open"


# ---------------------------------------------------------------------------- retry once


def _dies_on_second_request(how: str, fresh: Script) -> Script:
    def script(peer: Peer) -> None:
        if peer.index > 0:
            fresh(peer)
            return
        peer.read_request()
        peer.send(response(b"one"))
        peer.read_request()  # the next request on the kept-alive connection...
        if how == "reset":
            peer.reset()  # ...is dropped unanswered
    return script


@pytest.mark.parametrize("how", ["close", "reset"])
@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "PUT", "DELETE"])
def test_reused_connection_dying_is_retried_once(
        driver: Driver, serve: Any, how: str, method: str) -> None:
    up = serve(_dies_on_second_request(how, answer(response(b"two"))))
    assert driver.fetch(up.url)[1] == b"one"
    resp, body = driver.fetch(up.url, method=method)
    assert resp.status == 200 and body == (b"" if method == "HEAD" else b"two")
    assert len(up.peers) == 2


def test_retry_happens_only_once(driver: Driver, serve: Any) -> None:
    def close_unanswered(peer: Peer) -> None:
        peer.read_request()

    up = serve(_dies_on_second_request("close", close_unanswered))
    assert driver.fetch(up.url)[1] == b"one"
    with pytest.raises(httpx.RemoteProtocolError):
        driver.fetch(up.url)
    time.sleep(0.2)
    assert len(up.peers) == 2


@pytest.mark.parametrize(("method", "frame"), [
    ("POST", None),
    ("PUT", (b"Content-Length", b"4")),
    ("GET", (b"Transfer-Encoding", b"chunked")),
])
def test_no_retry_for_bodies_or_unsafe_methods(
        driver: Driver, serve: Any, method: str, frame: tuple[bytes, bytes] | None) -> None:
    up = serve(_dies_on_second_request("close", answer(response(b"two"))))
    assert driver.fetch(up.url)[1] == b"one"
    headers = [(b"Host", b"u")] + ([frame] if frame else [])
    with pytest.raises(httpx.RemoteProtocolError):
        driver.fetch(up.url, method=method, headers=headers,
                     body=[b"data"] if frame else None)
    time.sleep(0.2)
    assert len(up.peers) == 1


def test_fresh_connection_is_not_retried(driver: Driver, serve: Any) -> None:
    up = serve(lambda peer: peer.read_request())
    with pytest.raises(httpx.RemoteProtocolError):
        driver.fetch(up.url)
    time.sleep(0.2)
    assert len(up.peers) == 1


# ---------------------------------------------------------------------------- cancellation


@pytest.fixture(params=ASYNC_KINDS)
def async_driver(request: pytest.FixtureRequest) -> Iterator[Driver]:
    # Cancellation is an asyncio notion: these tests exist for the async transport only.
    driver = Driver(str(request.param), max_connections=1)
    yield driver
    driver.close()


def _settled() -> bool:
    time.sleep(0.3)  # nothing to observe: give the coroutine time to reach its await
    return True


def _cancel(driver: Driver, coro: Any, ready: Callable[[], bool]) -> None:
    future = driver.submit(coro)
    deadline = time.monotonic() + WAIT
    while not ready() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ready() and not future.done()
    future.cancel()
    with pytest.raises(concurrent.futures.CancelledError):
        future.result(WAIT)


def _slot_is_free(driver: Driver, serve: Any) -> None:
    fast = serve(answer(response(b"free")))
    assert driver.fetch(fast.url, timeout={"pool": 2.0})[1] == b"free"


def test_cancel_while_waiting_for_head(async_driver: Driver, serve: Any) -> None:
    up = serve(hang)
    assert async_driver.async_ is not None
    coro = async_driver.async_.handle_async_request(async_driver.request(up.url))
    _cancel(async_driver, coro, lambda: bool(up.peers and up.peers[0].received))
    assert up.finished(0).eof  # the upstream connection closed at once
    _slot_is_free(async_driver, serve)


def test_cancel_while_reading_body(async_driver: Driver, serve: Any) -> None:
    up = serve(pause_then_body(WAIT))
    resp = async_driver.send(async_driver.request(up.url))

    async def read_all(response: httpx.Response) -> None:
        try:
            async for _ in response.aiter_raw():
                pass
        finally:
            await response.aclose()

    _cancel(async_driver, read_all(resp.response), _settled)
    assert up.finished(0).eof
    _slot_is_free(async_driver, serve)


def test_cancel_during_upload(async_driver: Driver, serve: Any) -> None:
    up = serve(hang)
    assert async_driver.async_ is not None
    request = async_driver.request(
        up.url, method="POST", headers=[(b"Host", b"u"), (b"Transfer-Encoding", b"chunked")],
        body=[b"part", Stall()])
    coro = async_driver.async_.handle_async_request(request)
    _cancel(async_driver, coro, lambda: bool(up.peers and b"part" in up.peers[0].received))
    peer = up.finished(0)
    assert not peer.received.endswith(b"0\r\n\r\n")
    _slot_is_free(async_driver, serve)


def test_cancel_while_waiting_for_slot(async_driver: Driver, serve: Any) -> None:
    up = serve(pause_then_body(0.2))
    held = async_driver.send(async_driver.request(up.url))
    assert async_driver.async_ is not None
    coro = async_driver.async_.handle_async_request(async_driver.request(up.url))
    _cancel(async_driver, coro, _settled)
    assert held.read() == b"body"
    held.close()
    _slot_is_free(async_driver, serve)


def test_a_cancel_at_every_step_of_opening_leaks_nothing(async_driver: Driver,
                                                         serve: Any) -> None:
    """A cancel may come at any await of a request's start: as the pool hands out its
    slot, inside the loop's connect (the socket made, the transport not yet handed
    over: asyncio and uvloop close it themselves only when the cancel is raised in
    there, not in a wait_for wrapped around it), as the head is written. Swept over
    every loop step from the first to well past the request's arrival: each time,
    the connection (if one opened) closes, and the pool's one slot is free after."""
    up = serve(hang)
    transport = async_driver.async_
    assert transport is not None

    async def cancel_after(steps: int) -> bool:
        task = asyncio.ensure_future(transport.handle_async_request(
            async_driver.request(up.url)))
        for _ in range(steps):
            await asyncio.sleep(0)
        finished = task.done()
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        return finished

    arrived_at = None
    for steps in range(60):
        assert not async_driver.run(cancel_after(steps))  # it never answers: cancelled
        if arrived_at is None and any(peer.received for peer in up.peers):
            arrived_at = steps
        if arrived_at is not None and steps >= arrived_at + 5:
            break
    assert arrived_at is not None, "no request reached the upstream in 60 loop steps"
    assert len(up.peers) >= 2  # some cancels came after the connection opened
    time.sleep(0.2)  # the last accepts
    for index in range(len(up.peers)):
        assert up.finished(index).eof  # each connection closed by the client
    _slot_is_free(async_driver, serve)


# ---------------------------------------------------------------------------- TLS

CERT = b"""-----BEGIN CERTIFICATE-----
MIIBmzCCAUGgAwIBAgIUWMyASySaZWce7s+aYEPFW+KO1KswCgYIKoZIzj0EAwIw
FDESMBAGA1UEAwwJbG9jYWxob3N0MCAXDTI2MTEyNDA5NTUwOVoYDzIxMjYxMDMx
MDk1NTA5WjAUMRIwEAYDVQQDDAlsb2NhbGhvc3QwWTATBgcqhkjOPQIBBggqhkjO
PQMBBwNCAARZHwqwL9OQgOEkekctySXq8OjjdT7K1iv0DTO2iJDMaiMowS2GgrFP
k/7259EEJ44pnbZV+lSanLpderi/nbZro28wbTAdBgNVHQ4EFgQUGtmJwT6U8gqA
kIkcTc1Rg/jPt0YwHwYDVR0jBBgwFoAUGtmJwT6U8gqAkIkcTc1Rg/jPt0YwDwYD
VR0TAQH/BAUwAwEB/zAaBgNVHREEEzARgglsb2NhbGhvc3SHBH8AAAEwCgYIKoZI
zj0EAwIDSAAwRQIhAOEEJy5mAf9z7RCmnggw6Tx0zSmQKvUf3HUbc9TsoUTmAiB0
6BWJIMIYpBg5x0Mtosn6tntREjOEN1uB4gh+RO88xA==
-----END CERTIFICATE-----
"""
# A throwaway self-signed key for "localhost", generated for these tests only.
KEY = b"""-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgL8y8tOOF4ElQ0EOz
g2NhMOmvfx9OlPBQiDbS6Imleg6hRANCAARZHwqwL9OQgOEkekctySXq8OjjdT7K
1iv0DTO2iJDMaiMowS2GgrFPk/7259EEJ44pnbZV+lSanLpderi/nbZr
-----END PRIVATE KEY-----
"""


@pytest.fixture(scope="module")
def tls_server_context() -> Iterator[tuple[ssl.SSLContext, list[str]]]:
    names: list[str] = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        cert.write_bytes(CERT)
        key.write_bytes(KEY)
        context.load_cert_chain(cert, key)

    def record_sni(sock: Any, name: str | None, ctx: Any) -> None:
        names.append(name or "")

    context.sni_callback = record_sni
    yield context, names


def test_https_upstream_with_sni(make_driver: Callable[..., Driver], serve: Any,
                                 tls_server_context: tuple[ssl.SSLContext, list[str]]) -> None:
    server_context, names = tls_server_context
    client_context = ssl.create_default_context(cadata=CERT.decode())
    driver = make_driver(ssl_context=client_context)
    up = serve(answer(response(b"secret"), response(b"again")), tls=server_context)
    url = f"https://localhost:{up.port}/"
    assert driver.fetch(url)[1] == b"secret"
    assert driver.fetch(url)[1] == b"again"  # kept alive over TLS
    assert names[-1:] == ["localhost"]
    assert up.peers[0].requests[0].request_line == b"GET / HTTP/1.1"


def test_https_upstream_certificate_is_verified(
        driver: Driver, serve: Any, tls_server_context: tuple[ssl.SSLContext, list[str]]) -> None:
    up = serve(answer(response()), tls=tls_server_context[0])
    with pytest.raises(httpx.ConnectError):
        driver.fetch(f"https://localhost:{up.port}/")


# ------------------------------------------------------------- sync: the client leaves first


def _fetch_watched(up: Upstream, watch: ClientWatch, timeout: float = WAIT) -> httpx.Response:
    transport = UpstreamTransport()
    request = httpx.Request("GET", up.url, headers=[(b"Host", b"u")],
                            extensions={"timeout": {"connect": timeout, "read": timeout,
                                                    "write": timeout, "pool": timeout},
                                        CLIENT_WATCH: watch})
    try:
        response = transport.handle_request(request)
        response.read()
        return response
    finally:
        transport.close()


@pytest.mark.parametrize("how", ["close", "shutdown-write", "reset"])
def test_client_socket_gone_ends_the_wait_for_the_head(serve: Any, how: str) -> None:
    up = serve(hang)
    client, server_side = socket.socketpair()
    with client, server_side:
        def leave() -> None:
            time.sleep(0.2)
            if how == "close":
                client.close()
            elif how == "shutdown-write":
                client.shutdown(socket.SHUT_WR)  # a FIN, as nginx sees a client that left
            else:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
        threading.Thread(target=leave, daemon=True).start()
        started = time.monotonic()
        with pytest.raises(ClientDisconnected):
            _fetch_watched(up, ClientWatch(sock=server_side))
        assert time.monotonic() - started < WAIT
    up.finished(0)  # the upstream request was closed, not left hanging


def test_gone_event_ends_the_wait_for_the_head(serve: Any) -> None:
    up = serve(hang)
    gone = threading.Event()
    threading.Timer(0.2, gone.set).start()
    with pytest.raises(ClientDisconnected):
        _fetch_watched(up, ClientWatch(gone=gone))
    up.finished(0)


def test_pipelined_client_bytes_do_not_end_the_wait(serve: Any) -> None:
    """Bytes of a next request are not a disconnect: the answer still comes through."""
    up = serve(pause_then_head(0.3))
    client, server_side = socket.socketpair()
    with client, server_side:
        client.sendall(b"GET /next HTTP/1.1\r\nHost: p\r\n\r\n")
        response = _fetch_watched(up, ClientWatch(sock=server_side))
        assert (response.status_code, response.content) == (200, b"ok")
        assert server_side.recv(100).startswith(b"GET /next")  # left for the server


def test_watched_wait_still_times_out(serve: Any) -> None:
    up = serve(hang)
    client, server_side = socket.socketpair()
    with client, server_side:
        with pytest.raises(httpx.ReadTimeout):
            _fetch_watched(up, ClientWatch(sock=server_side, gone=threading.Event()),
                           timeout=0.3)


def pause_then_head(pause: float) -> Script:
    def script(peer: Peer) -> None:
        peer.read_request()
        time.sleep(pause)
        peer.send(response())

    return script


# ------------------------------------------------ broken upstreams, bounds, deadlines (issue 17)


def close_delimited(body: bytes, end: Callable[[Peer], None]) -> Script:
    """Answer with a close-delimited body (no framing header), then `end` the connection."""

    def script(peer: Peer) -> None:
        peer.read_request()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + body)
        time.sleep(0.2)
        end(peer)

    return script


def test_reset_never_ends_a_close_delimited_body(driver: Driver, serve: Any) -> None:
    """A close-delimited body ends only with a clean close: a reset is a broken upstream."""
    up = serve(close_delimited(b"x" * 1000, Peer.reset))
    resp = driver.send(driver.request(up.url))
    received = bytearray()
    with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
        while (chunk := resp.next_chunk()) is not None:
            received += chunk
    resp.close()
    assert len(received) <= 1000


def test_fin_ends_a_close_delimited_body(driver: Driver, serve: Any) -> None:
    up = serve(close_delimited(b"x" * 1000, lambda peer: peer.sock.close()))
    assert driver.fetch(up.url)[1] == b"x" * 1000


@pytest.mark.parametrize("clean", [True, False], ids=["close_notify", "cut"])
def test_tls_cut_never_ends_a_close_delimited_body(
        make_driver: Callable[..., Driver], serve: Any,
        tls_server_context: tuple[ssl.SSLContext, list[str]], clean: bool) -> None:
    """Over TLS, a close-delimited body ends with close_notify; a TCP close without it
    could be a truncation attack (RFC 8446 6.1): a broken upstream."""
    def end(peer: Peer) -> None:
        sock = cast(ssl.SSLSocket, peer.sock)
        if clean:
            sock.unwrap()  # sends close_notify
        sock.close()

    driver = make_driver(ssl_context=ssl.create_default_context(cadata=CERT.decode()))
    up = serve(close_delimited(b"x" * 1000, end), tls=tls_server_context[0])
    url = f"https://localhost:{up.port}/"
    if clean:
        assert driver.fetch(url)[1] == b"x" * 1000
    else:
        with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
            driver.fetch(url)


def _trailers(total: int) -> Script:
    """A chunked body whose trailer section is `total` bytes (its final CRLF included),
    sent in lines of about 100 bytes, one send each."""

    def script(peer: Peer) -> None:
        peer.read_request()
        peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n")
        left = total - 2
        while left > 0:
            size = min(100, left)
            line = b"X-T: " + b"t" * (size - 7) + b"\r\n" if size >= 8 else b""
            if not line:  # a short remainder: one line of its own size
                line = b"X:" + b"t" * (size - 4) + b"\r\n"
            peer.send(line)
            left -= len(line)
        peer.send(b"\r\n")
        peer.wait_eof()

    return script


def test_trailer_section_at_the_limit_is_read(driver: Driver, serve: Any) -> None:
    up = serve(_trailers(65536))
    assert driver.fetch(up.url)[1] == b"hello"


def test_trailer_section_past_the_limit_is_refused(driver: Driver, serve: Any) -> None:
    """Bounded as a whole (not per line) and whatever the reads: 64 KiB, then refused."""
    up = serve(_trailers(65536 + 1024))
    with pytest.raises(httpx.RemoteProtocolError):
        driver.fetch(up.url)


@pytest.mark.parametrize("size", [65536, 65537])
def test_head_bound_whatever_the_reads(driver: Driver, serve: Any, size: int) -> None:
    """A head of one byte past 64 KiB is refused even when it arrives in one read."""
    start = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
    filler = b"X-F: " + b"f" * (size - len(start) - 9) + b"\r\n"
    head = start + filler + b"\r\n"
    assert len(head) == size
    up = serve(answer(head + b"ok"))
    if size <= 65536:
        assert driver.fetch(up.url)[1] == b"ok"
    else:
        with pytest.raises(httpx.RemoteProtocolError):
            driver.fetch(up.url)


def test_head_timeout_is_a_deadline(driver: Driver, serve: Any) -> None:
    """A head trickled a byte at a time never resets the clock: the read timeout
    bounds connect plus the whole head."""

    def trickle(peer: Peer) -> None:
        peer.read_request()
        for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok":
            peer.sock.sendall(bytes([byte]))  # raises once the client left
            time.sleep(0.3)

    up = serve(trickle)
    with pytest.raises(httpx.ReadTimeout):
        driver.fetch(up.url, timeout={"read": 1.0})
    up.finished(0)  # and the connection was closed


def test_paused_connection_sees_its_upstream_close(async_driver: Driver, serve: Any) -> None:
    """The read that brings the last body bytes past the high-water mark pauses
    reading; pooled so, the connection would never see the upstream close it and
    a POST on it would fail (a body is never retried)."""
    size = HIGH_WATER + 1  # only the very last byte crosses the mark

    def idle_close(peer: Peer) -> None:
        while peer.read_request() is not None:
            body = b"b" * size if peer.requests[-1].request_line.startswith(b"GET") else b"ok"
            peer.send(response(body))
            if peer.closed_within(0.5):
                return
            if not peer.buf:  # idle for 0.5 s: closed, as servers close idle connections
                return

    up = serve(idle_close)
    resp = async_driver.send(async_driver.request(up.url))
    body = resp.response.stream
    # The whole body is in the codec before the first piece is taken: the pause
    # comes with the last byte (the transport's own state, looked at directly).
    assert wait_until(lambda: body._conn is not None and body._conn.codec.pending >= size)
    assert len(resp.read()) == size
    resp.close()
    assert up.finished(0).done.is_set()
    post = async_driver.fetch(up.url, method="POST",
                              headers=[(b"Host", b"u"), (b"Content-Length", b"4")],
                              body=[b"data"])
    assert post[0].status == 200 and post[1] == b"ok"


def test_pool_slot_handed_as_the_timeout_fires() -> None:
    """A slot handed to a waiter in the loop step its pool timeout fires in is used
    or given back, never lost (Python 3.12's wait_for turned it into a TimeoutError
    and the slot stayed taken for good). The step is made deterministic on a loop
    whose clock the test moves."""
    loop = asyncio.new_event_loop()
    now = [loop.time()]
    loop.time = lambda: now[0]  # type: ignore[method-assign]
    pool = AsyncUpstreamTransport(max_connections=1)

    async def race() -> str:
        await pool._acquire(None)  # the one slot, held
        waiting = asyncio.ensure_future(pool._acquire(1.0))
        await asyncio.sleep(0)  # the waiter queued, its timer armed
        now[0] += 2.0  # the timer is due at the next step ...
        loop.call_soon(pool._release)  # ... where the slot is handed over first
        try:
            await waiting
        except httpx.PoolTimeout:
            return "timed out"
        pool._release()  # the waiter got the slot: done with it
        return "served"

    try:
        outcome = loop.run_until_complete(race())
    finally:
        loop.close()
    assert outcome in ("served", "timed out")
    assert pool.in_use() == 0, f"a slot was lost ({outcome})"


def test_sync_pool_slot_freed_as_the_timeout_fires() -> None:
    """The sync pool hands no slot over: a waiter woken after its deadline looks at the
    count again under the lock, so a slot freed as its timeout fires is taken or stays
    free, never lost. Made certain by freeing it while holding the lock past the deadline."""
    pool = UpstreamTransport(max_connections=1)
    pool._acquire(Call(b"GET", b"/", [], None, ("http", "u", 80), {}))
    outcome: list[str] = []

    def wait_for_slot() -> None:
        try:
            pool._acquire(Call(b"GET", b"/", [], None, ("http", "u", 80),
                               {"timeout": {"pool": 0.2}}))
        except httpx.PoolTimeout:
            outcome.append("timed out")
        else:
            outcome.append("served")
            pool._release()

    waiter = threading.Thread(target=wait_for_slot)
    with pool._cond:  # the waiter's deadline passes while it cannot get the lock
        waiter.start()
        time.sleep(0.4)
        pool._release()
    waiter.join(WAIT)
    assert outcome == ["served"]
    assert pool.in_use() == 0
