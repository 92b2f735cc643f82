"""The WSGI face's WebSocket tunnel (websocket.tunnel, .splice, .framing), on real sockets.

`relay` is tested on TCP pairs over loopback: bytes read before the tunnel
opened go first, a FIN is passed on while the other direction goes on, a reset
ends both, a slow reader stalls the writer, and quiet sockets hit the idle
limit. Then real servers: werkzeug's threaded server with a scripted raw
upstream (the 101's trailing bytes, a refusal relayed), wsgiref (501), and the
Flask glue under `flask run` in front of the suite's WebSocket upstream.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect
from werkzeug.serving import make_server as werkzeug_server

from dualproxy.websocket import splice
from dualproxy.websocket.framing import FrameScanner
from dualproxy.websocket.splice import SpliceResult, relay
from dualproxy.wsgi import SyncProxy
from tests.conftest import ROOT, MakeProxy, ProxyProcess, free_port
from tests.ws_upstream import WsUpstream

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
HANDSHAKE = (b"GET /ws/a%2Fb?x=1&y= HTTP/1.1\r\nHost: front\r\nUpgrade: websocket\r\n"
             b"Connection: Upgrade\r\nSec-WebSocket-Key: " + KEY + b"\r\n"
             b"Sec-WebSocket-Version: 13\r\n\r\n")


def tcp_pair(buffer: int | None = None) -> tuple[socket.socket, socket.socket]:
    """Two connected TCP sockets on loopback (optionally with small kernel buffers)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.socket()
        if buffer is not None:
            for sock in (a, listener):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
        a.connect(listener.getsockname())
        b, _ = listener.accept()
    return a, b


def recv_exactly(sock: socket.socket, size: int, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while len(data) < size:
        piece = sock.recv(size - len(data))
        if not piece:
            break
        data += piece
    return data


def at_eof(sock: socket.socket, timeout: float = 3.0) -> bool:
    """True once the peer closed (FIN or reset) within `timeout`, with nothing else pending."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


class Relayed:
    """`relay` running in a thread between a test client and a test upstream."""

    def __init__(self, buffer: int | None = None, **kwargs: Any) -> None:
        self.client, client_side = tcp_pair(buffer)
        upstream_side, self.upstream = tcp_pair(buffer)
        self.result: SpliceResult | None = None
        self.ended_at: float | None = None

        def run() -> None:
            try:
                self.result = relay(client_side, upstream_side, **kwargs)
            finally:
                self.ended_at = time.monotonic()
                client_side.close()
                upstream_side.close()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self, timeout: float = 5.0) -> SpliceResult | None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the relay did not end"
        return self.result

    def close(self) -> None:
        self.client.close()
        self.upstream.close()
        self.thread.join(10)


@pytest.fixture
def relayed() -> Iterator[Callable[..., Relayed]]:
    made: list[Relayed] = []

    def make(**kwargs: Any) -> Relayed:
        made.append(Relayed(**kwargs))
        return made[-1]

    yield make
    for item in made:
        item.close()


def test_bytes_read_before_the_tunnel_go_first(relayed: Callable[..., Relayed]) -> None:
    r = relayed(to_client=b"early-frame", to_upstream=b"client-early")
    r.upstream.sendall(b"+later")
    assert recv_exactly(r.client, 17) == b"early-frame+later"
    r.client.sendall(b"+after")
    assert recv_exactly(r.upstream, 18) == b"client-early+after"
    r.upstream.close()
    r.client.close()
    assert r.join() == SpliceResult(18, 17)


def test_half_close_passes_the_fin_and_the_other_way_goes_on(
        relayed: Callable[..., Relayed]) -> None:
    r = relayed()
    r.client.sendall(b"bye")
    r.client.shutdown(socket.SHUT_WR)
    assert recv_exactly(r.upstream, 3) == b"bye"
    assert at_eof(r.upstream)                     # the client's FIN reached the upstream
    r.upstream.sendall(b"close-frame")            # ... which may still answer
    assert recv_exactly(r.client, 11) == b"close-frame"
    started = time.monotonic()
    r.upstream.close()
    assert at_eof(r.client)
    assert r.join() == SpliceResult(3, 11)
    assert r.ended_at is not None and r.ended_at - started < 2


def test_a_half_open_tunnel_ends_after_the_linger(
        relayed: Callable[..., Relayed], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(splice, "LINGER", 0.3)
    r = relayed()
    r.client.shutdown(socket.SHUT_WR)
    assert at_eof(r.upstream)
    # The upstream never closes: the tunnel gives up on it after LINGER.
    assert at_eof(r.client)
    assert r.join() == SpliceResult(0, 0)


def test_an_end_stuck_behind_a_reader_that_stopped_still_ends_the_tunnel(
        relayed: Callable[..., Relayed], monkeypatch: pytest.MonkeyPatch) -> None:
    """The upstream ends while the client reads nothing: its last bytes cannot be flushed,
    so the tunnel gives up after LINGER instead of waiting on TCP's retransmissions."""
    monkeypatch.setattr(splice, "LINGER", 0.5)
    size = 8 << 20  # far more than the client side's kernel buffers take
    r = relayed(buffer=32768, to_client=b"z" * size)
    time.sleep(0.2)  # the relay has filled the client's buffers and waits to write
    started = time.monotonic()
    r.upstream.close()  # nothing queued behind it: the FIN reaches the proxy at once
    r.join()
    assert r.ended_at is not None and r.ended_at - started < 3
    delivered = len(recv_exactly(r.client, size, timeout=2))
    assert delivered < size  # the unsent rest was dropped with the tunnel


def test_a_reset_upstream_closes_the_client_at_once(relayed: Callable[..., Relayed]) -> None:
    r = relayed()
    r.upstream.sendall(b"x")
    assert recv_exactly(r.client, 1) == b"x"
    # SO_LINGER 0: close() sends RST, the way a killed or vanished host looks.
    r.upstream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    r.upstream.close()
    assert at_eof(r.client)
    result = r.join()
    assert result is not None and result[:2] == (0, 1)
    assert result.failure is not None and "ConnectionResetError" in result.failure


def test_a_vanished_client_closes_the_upstream(
        relayed: Callable[..., Relayed], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(splice, "LINGER", 0.5)
    r = relayed()
    r.client.close()
    assert at_eof(r.upstream, timeout=0.4)  # the FIN is passed on at once
    r.upstream.sendall(b"ping")  # an upstream that does not close is cut after LINGER
    result = r.join()
    assert result is not None and result.to_client in (0, 4)  # the client may be gone first


def frame(payload: bytes, opcode: int = 0x2, *, fin: bool = True, masked: bool = False) -> bytes:
    """One WebSocket frame (RFC 6455 5.2), for the tests that need real ones."""
    first = bytes([(0x80 if fin else 0) | opcode])
    size = len(payload)
    mask_bit = 0x80 if masked else 0
    if size < 126:
        length = bytes([mask_bit | size])
    elif size < 65536:
        length = bytes([mask_bit | 126]) + size.to_bytes(2, "big")
    else:
        length = bytes([mask_bit | 127]) + size.to_bytes(8, "big")
    if not masked:
        return first + length + payload
    key = b"\x01\x02\x03\x04"
    return first + length + key + bytes(b ^ key[n % 4] for n, b in enumerate(payload))


def read_close(sock: socket.socket) -> tuple[bool, int]:
    """(masked, code) of the close frame `sock` receives next, checked to be followed by EOF."""
    head = recv_exactly(sock, 2)
    assert head[0] == 0x88, head
    masked, size = bool(head[1] & 0x80), head[1] & 0x7F
    key = recv_exactly(sock, 4) if masked else b"\0\0\0\0"
    payload = bytes(b ^ key[n % 4] for n, b in enumerate(recv_exactly(sock, size)))
    assert at_eof(sock)
    return masked, int.from_bytes(payload[:2], "big")


def test_a_quiet_tunnel_ends_at_the_idle_limit_with_1001(
        relayed: Callable[..., Relayed]) -> None:
    r = relayed(idle=0.5)
    ping = frame(b"p", masked=True)
    for _ in range(4):  # traffic every 0.25 s keeps it open past the limit
        time.sleep(0.25)
        r.client.sendall(ping)
        assert recv_exactly(r.upstream, len(ping)) == ping
    started = time.monotonic()
    assert read_close(r.client) == (False, 1001)    # to the client: unmasked
    assert read_close(r.upstream) == (True, 1001)   # to the upstream: masked, as a client's
    assert r.join() == SpliceResult(4 * len(ping), 0)
    assert r.ended_at is not None and 0.2 < r.ended_at - started < 3


def test_a_message_over_the_limit_ends_both_with_1009(relayed: Callable[..., Relayed]) -> None:
    r = relayed(max_size=1000)
    whole = frame(b"a" * 1000, 0x1, masked=True)
    r.client.sendall(whole)
    assert recv_exactly(r.upstream, len(whole)) == whole
    # Fragments add up: the third makes the message 1200 bytes and is never relayed.
    first, second = frame(b"b" * 400, 0x1, fin=False), frame(b"c" * 400, 0x0, fin=False)
    r.upstream.sendall(first + frame(b"", 0x9) + second + frame(b"d" * 400, 0x0))
    expected = first + frame(b"", 0x9) + second
    assert recv_exactly(r.client, len(expected)) == expected
    assert read_close(r.client) == (False, 1009)
    assert read_close(r.upstream) == (True, 1009)
    r.join()


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 70000])
def test_frame_scanner_follows_frames_split_anywhere(size: int) -> None:
    stream = frame(b"x" * size, masked=True) + frame(b"", 0xA) + frame(b"y" * 3, 0x1)
    for cut in sorted({1, 2, 3, 5, 9, 13, len(stream) // 2, len(stream) - 1}):
        scanner = FrameScanner(None)
        assert scanner.scan(stream[:cut]) is None
        assert scanner.scan(stream[cut:]) is None
        assert scanner.at_boundary and scanner.message == 0
    scanner = FrameScanner(size - 1 if size else None)
    assert scanner.scan(stream) == (0 if size else None)


def test_a_slow_reader_stalls_the_writer(relayed: Callable[..., Relayed]) -> None:
    """With small kernel buffers, a client that reads nothing lets the upstream send
    only what the buffers and the tunnel's one read hold, then the rest arrives whole."""
    r = relayed(buffer=32768)
    total = 16 << 20
    payload = hashlib.sha256(b"seed").digest() * (total // 32)
    sent = 0
    r.upstream.settimeout(1.0)
    try:
        while sent < total:
            sent += r.upstream.send(payload[sent:sent + 65536])
    except TimeoutError:
        pass
    assert sent < 2 << 20, f"{sent} bytes went in while nobody read"

    def send_rest() -> None:
        r.upstream.settimeout(10)
        r.upstream.sendall(payload[sent:])
        r.upstream.close()

    writer = threading.Thread(target=send_rest, daemon=True)
    writer.start()
    got = recv_exactly(r.client, total, timeout=10)
    writer.join(10)
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (openssl is on every CI image here)."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = str(folder / "cert.pem"), str(folder / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", key, "-out", cert], check=True, capture_output=True)
    return cert, key


def test_a_tls_client_side_relays_and_ends_the_tunnel(tls_files: tuple[str, str]) -> None:
    """A TLS client socket (gunicorn --certfile): 1 MiB both ways through TLS records,
    and the end of either side ends the tunnel."""
    cert, key = tls_files
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=cert)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        raw = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
    result: list[object] = []
    handshake = threading.Thread(target=lambda: result.append(
        server_ctx.wrap_socket(accepted, server_side=True)))
    handshake.start()
    client = client_ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    handshake.join(5)
    client_side = result[0]
    assert isinstance(client_side, ssl.SSLSocket)
    upstream_side, upstream = tcp_pair()
    done: list[object] = []
    def run_relay() -> None:
        try:
            done.append(relay(client_side, upstream_side))
        except BaseException as exc:
            done.append(exc)
            raise

    relay_thread = threading.Thread(target=run_relay, daemon=True)
    relay_thread.start()
    payload = os.urandom(1 << 20)
    client.sendall(payload)
    assert recv_exactly(upstream, len(payload)) == payload
    upstream.sendall(payload[::-1])
    assert recv_exactly(client, len(payload)) == payload[::-1]
    client.close()
    assert at_eof(upstream)  # the client's end reached the upstream ...
    upstream.close()         # ... whose close ends the tunnel, not a TLS half-close
    relay_thread.join(5)
    assert done == [SpliceResult(len(payload), len(payload))]
    for sock in (client_side, upstream_side):
        sock.close()


# -- on real WSGI servers ------------------------------------------------------------------


class ScriptedUpstream:
    """A raw TCP upstream that records the head it got and answers with fixed bytes."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.heads: list[bytes] = []
        self.received = b""
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            conn.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, self.received = data.partition(b"\r\n\r\n")
            self.heads.append(head)
            conn.sendall(self.answer)  # head and what follows, in one write
            try:
                while piece := conn.recv(65536):
                    self.received += piece
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()


def serve_in_thread(server: Any) -> Iterator[str]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def raw_exchange(address: str, request: bytes, then: bytes = b"") -> tuple[bytes, bytes]:
    """Send `request`, read the answer head, send `then`; (head, bytes after it so far)."""
    host, port = address.split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            piece = sock.recv(65536)
            assert piece, f"closed before the head: {data!r}"
            data += piece
        head, _, rest = data.partition(b"\r\n\r\n")
        sock.sendall(then)
        sock.settimeout(1)
        try:
            while piece := sock.recv(65536):
                rest += piece
        except OSError:
            pass
    return head, rest


def test_werkzeug_tunnel_forwards_the_bytes_after_the_101() -> None:
    frame = b"\x81\x05hello"
    upstream = ScriptedUpstream(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + ACCEPT +
                                b"\r\nSet-Cookie: s=1\r\n\r\n" + frame)
    proxy = SyncProxy(upstream.url, access_log=False)
    server = werkzeug_server("127.0.0.1", 0, proxy, threaded=True)
    for address in serve_in_thread(server):
        # Bytes pipelined behind the handshake (in werkzeug's rfile buffer) go first.
        head, rest = raw_exchange(address, HANDSHAKE + b"\x81\x80wxyz", then=b"\x88\x80abcd")
    upstream.close()
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 101 Switching Protocols"
    assert {b"upgrade: websocket", b"connection: Upgrade", b"set-cookie: s=1",
            b"sec-websocket-accept: " + ACCEPT} <= set(lines[1:])
    assert rest == frame
    sent = upstream.heads[0].split(b"\r\n")
    assert sent[0] == b"GET /ws/a%2Fb?x=1&y= HTTP/1.1"
    assert b"sec-websocket-key: " + KEY in sent and b"upgrade: websocket" in sent
    assert upstream.received == b"\x81\x80wxyz\x88\x80abcd"


def test_werkzeug_relays_the_upstream_refusal() -> None:
    upstream = ScriptedUpstream(b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\n"
                                b"Transfer-Encoding: chunked\r\n\r\n4\r\nnope\r\n0\r\n\r\n")
    proxy = SyncProxy(upstream.url, access_log=False)
    server = werkzeug_server("127.0.0.1", 0, proxy, threaded=True)
    for address in serve_in_thread(server):
        head, rest = raw_exchange(address, HANDSHAKE)
    upstream.close()
    assert head.startswith(b"HTTP/1.1 403 ")
    assert b"nope" in rest and b"Upgrade" not in head


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_wsgiref_answers_501() -> None:
    """wsgiref gives the app no client socket: a 501 problem before any upstream contact."""
    upstream = ScriptedUpstream(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    proxy = SyncProxy(upstream.url, access_log=False)
    server = make_server("127.0.0.1", 0, proxy, handler_class=_QuietHandler)
    for address in serve_in_thread(server):
        head, body = raw_exchange(address, HANDSHAKE)
        assert upstream.heads == []
        plain, text = raw_exchange(address, b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n")
    proxy.close()
    upstream.close()
    assert head.split(b"\r\n")[0] == b"HTTP/1.0 501 Not Implemented"
    assert b"content-type: application/problem+json" in head.lower()
    problem = json.loads(body)
    assert problem["status"] == 501 and "WebSocket" in problem["detail"]
    assert plain.split(b"\r\n")[0] == b"HTTP/1.0 200 OK" and text == b"ok"


# -- the Flask glue under `flask run` -----------------------------------------------------


def flask_app() -> Any:
    """The app `flask run` serves below: every glue form, and an auth hook on one."""
    from flask import Flask, abort, request

    from dualproxy.flask import FlaskProxy, proxy_blueprint, wrap_wsgi_app

    upstream = os.environ["WS_TUNNEL_UPSTREAM"]
    app = Flask(__name__)
    ext = FlaskProxy(app, upstream=upstream, prefix="/ext", access_log=False)
    app.register_blueprint(proxy_blueprint("bp", upstream, "/bp", access_log=False),
                           url_prefix="/outer")

    @app.before_request
    def guard() -> None:
        if request.blueprint == ext.name and request.headers.get("x-token") != "ok":
            abort(401)

    wrap_wsgi_app(app, upstream, mount="/mw", access_log=False)
    return app


@pytest.fixture(scope="module")
def flask_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, WsUpstream]]:
    upstream = WsUpstream().start()
    port = free_port()
    env = {**os.environ, "WS_TUNNEL_UPSTREAM": upstream.url}
    log_path = tmp_path_factory.mktemp("flask") / "flask.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flask", "--app", "tests.test_ws_tunnel:flask_app()", "run",
             "--port", str(port), "--no-reload", "--no-debugger"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        yield f"ws://127.0.0.1:{port}", upstream
    finally:
        proc.terminate()
        proc.wait(10)
        upstream.stop()


@pytest.mark.parametrize("prefix", ["/ext", "/outer", "/mw"])
def test_flask_glue_proxies_websockets_under_its_prefix(
        flask_run: tuple[str, WsUpstream], prefix: str) -> None:
    base, upstream = flask_run
    rid = uuid.uuid4().hex
    headers = {"x-req-id": rid, "x-token": "ok"}
    with connect(f"{base}{prefix}/chat/a%2Fb?x=1", additional_headers=headers,
                 subprotocols=["chat"]) as ws:   # type: ignore[list-item]
        ws.send("hello")
        assert ws.recv(timeout=5) == "hello"
        ws.send(b"\x00\xff" * 100000)
        assert ws.recv(timeout=5) == b"\x00\xff" * 100000
    record = upstream.wait_closed(rid)
    assert record.target == "/chat/a%2Fb?x=1"
    assert record.close_code == 1000


def test_flask_before_request_hook_refuses_the_handshake(
        flask_run: tuple[str, WsUpstream]) -> None:
    base, upstream = flask_run
    rid = uuid.uuid4().hex
    with pytest.raises(InvalidStatus) as caught:
        connect(f"{base}/ext/chat", additional_headers={"x-req-id": rid})
    assert caught.value.response.status_code == 401
    with pytest.raises(LookupError):
        upstream.records[rid]


# -- every pairing -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ws_upstream() -> Iterator[WsUpstream]:
    server = WsUpstream().start()
    yield server
    server.stop()


UVICORN_DROPS_EARLY_FRAME = (
    "uvicorn 0.54 (--ws websockets and websockets-sansio alike) drops a frame that arrives in "
    "the same read as the handshake; an ASGI app never sees it")


@pytest.mark.pairings
def test_a_frame_sent_right_behind_the_handshake_is_relayed(
        make_proxy: MakeProxy, ws_upstream: WsUpstream, pairing: str,
        request: pytest.FixtureRequest) -> None:
    """A client that does not wait for the 101 (RFC 6455 says it should) loses nothing:
    on the WSGI face that frame sits in the server's read buffer, not on the socket."""
    if pairing in ("asgi-uvicorn", "wsgi-uvicorn", "asgi-gunicorn"):  # uvicorn serves them
        request.applymarker(pytest.mark.xfail(strict=True, reason=UVICORN_DROPS_EARLY_FRAME))
    proxy = make_proxy(upstream_url=ws_upstream.url)
    hello = frame(b"early bird", 0x1, masked=True)
    head, rest = raw_exchange(f"127.0.0.1:{proxy.port}", HANDSHAKE.replace(
        b"Host: front", f"Host: 127.0.0.1:{proxy.port}".encode()) + hello)
    assert head.startswith(b"HTTP/1.1 101 "), head
    assert rest.startswith(frame(b"early bird", 0x1)), rest


def test_gunicorn_sync_worker_answers_501(tmp_path: Any) -> None:
    """gunicorn's sync worker has a socket but kills a worker busy past its timeout: 501."""
    port = free_port()
    env = {**os.environ, "WS_TUNNEL_UPSTREAM": "http://127.0.0.1:9"}
    with (tmp_path / "gunicorn.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-k", "sync", "-b", f"127.0.0.1:{port}",
             "--no-control-socket", "tests.test_ws_tunnel:flask_app()"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None and time.monotonic() < deadline
            try:
                head, body = raw_exchange(f"127.0.0.1:{port}",
                                          HANDSHAKE.replace(b"GET /ws", b"GET /mw/ws"))
                break
            except (OSError, AssertionError):
                time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(10)
    assert head.startswith(b"HTTP/1.1 501 "), head
    assert "gthread" in json.loads(body)["detail"]


def test_gthread_holds_one_thread_per_open_socket(ws_upstream: WsUpstream) -> None:
    """The documented limit, with the tunnel cap raised to every thread (by default one of
    two threads stays for HTTP: tests/test_server_limits.py): two open sockets take both
    threads, a third handshake and a plain request wait in gunicorn's queue, and run
    once one socket closes."""
    proxy = ProxyProcess("wsgi-gunicorn", ws_upstream.url,
                         ("--threads", "2", "--ws-max-tunnels", "2"))
    base = f"ws://127.0.0.1:{proxy.port}"
    try:
        with connect(f"{base}/a") as first, connect(f"{base}/b"):
            with pytest.raises(TimeoutError), connect(f"{base}/c", open_timeout=1):
                pass
            with pytest.raises(httpx.ReadTimeout):
                httpx.get(f"{proxy.url}/plain", timeout=1)
            first.close()
            # The freed thread first runs the queued (abandoned) two, then this one.
            with connect(f"{base}/d", open_timeout=10) as third:
                third.send("served")
                assert third.recv(timeout=5) == "served"
    finally:
        proxy.stop()
