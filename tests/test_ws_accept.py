"""What a proxied WebSocket must check before relaying: the 101 and the control frames.

An upstream's 101 must be a WebSocket accept (RFC 6455 4.1) before anything is
spliced: unit tests of `handshake.check_accept`, then every pairing in front of
a raw upstream that answers each handshake as its target says (a bare `101`, no
accept, a wrong one, an extension or subprotocol nobody offered ...) and then
records whatever arrives: the client's next bytes must never reach it. And a
control frame RFC 6455 5.5 forbids (over 125 bytes, fragmented) is never
relayed, whatever `--ws-max-size` says: the tunnel follows frames and closes
both sides 1002, as the ASGI servers and `websockets` do.
"""

from __future__ import annotations

import base64
import hashlib
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from dualproxy.websocket.framing import FrameScanner
from dualproxy.websocket.handshake import BadUpgrade, accept_key, check_accept
from tests.conftest import MakeProxy, xfail_on_granian
from tests.rawhttp import wait_until

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
REQUEST = [(b"host", b"u"), (b"sec-websocket-key", KEY), (b"sec-websocket-version", b"13"),
           (b"sec-websocket-protocol", b"chat"),
           (b"sec-websocket-extensions", b"permessage-deflate; client_max_window_bits")]
GOOD = [(b"upgrade", b"websocket"), (b"connection", b"Upgrade"),
        (b"sec-websocket-accept", b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")]


def test_accept_key_is_rfc_6455s_example() -> None:
    assert accept_key(KEY) == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize("response", [
    GOOD,
    [*GOOD, (b"sec-websocket-protocol", b"chat")],
    [*GOOD, (b"sec-websocket-extensions", b"permessage-deflate; server_no_context_takeover")],
    [(b"upgrade", b"WebSocket"), (b"connection", b"keep-alive, upgrade"), GOOD[2]],
])
def test_a_real_accept_passes(response: list[tuple[bytes, bytes]]) -> None:
    check_accept(REQUEST, response)


@pytest.mark.parametrize("response", [
    [],
    GOOD[1:],
    [GOOD[0], GOOD[2]],
    GOOD[:2],
    [*GOOD[:2], (b"sec-websocket-accept", accept_key(b"AAAAAAAAAAAAAAAAAAAAAA=="))],
    [*GOOD, GOOD[2]],
    [(b"upgrade", b"websocket, h2c"), *GOOD[1:]],
    [*GOOD, (b"sec-websocket-extensions", b"x-webkit-deflate-frame")],
    [*GOOD, (b"sec-websocket-protocol", b"admin")],
    [*GOOD, (b"sec-websocket-protocol", b"chat"), (b"sec-websocket-protocol", b"chat")],
])
def test_anything_else_is_refused(response: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(BadUpgrade) as info:
        check_accept(REQUEST, response)
    assert info.value.status == 502 and info.value.close_connection


def _accept(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())


# How the upstream answers a handshake, by the last segment of its target.
ANSWERS: dict[str, Callable[[bytes], bytes]] = {
    "bare": lambda key: b"HTTP/1.1 101\r\n\r\n",
    "no-accept": lambda key: b"HTTP/1.1 101 OK\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n",
    "wrong-accept": lambda key: (b"HTTP/1.1 101 OK\r\nUpgrade: websocket\r\nConnection: Upgrade"
                                 b"\r\nSec-WebSocket-Accept: " + _accept(b"x") + b"\r\n"),
    "no-upgrade": lambda key: (b"HTTP/1.1 101 OK\r\nConnection: Upgrade\r\n"
                               b"Sec-WebSocket-Accept: " + _accept(key) + b"\r\n"),
    "h2c": lambda key: (b"HTTP/1.1 101 OK\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n"
                        b"Sec-WebSocket-Accept: " + _accept(key) + b"\r\n"),
    "extension": lambda key: (b"HTTP/1.1 101 OK\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                              b"Sec-WebSocket-Accept: " + _accept(key) + b"\r\n"
                              b"Sec-WebSocket-Extensions: permessage-deflate\r\n"),
    "subprotocol": lambda key: (b"HTTP/1.1 101 OK\r\nUpgrade: websocket\r\nConnection: Upgrade"
                                b"\r\nSec-WebSocket-Accept: " + _accept(key) + b"\r\n"
                                b"Sec-WebSocket-Protocol: admin\r\n"),
    "good": lambda key: (b"HTTP/1.1 101 OK\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Accept: " + _accept(key) + b"\r\n"),
}


class AnsweringUpstream:
    """A raw upstream: answers each handshake as its target says (ANSWERS), then records
    every byte that arrives after the head, by target, and whether the peer closed."""

    def __init__(self) -> None:
        self.received: dict[str, bytes] = {}
        self.closed: set[str] = set()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            data = b""
            while b"\r\n\r\n" not in data:
                piece = conn.recv(65536)
                if not piece:
                    return
                data += piece
            head, _, rest = data.partition(b"\r\n\r\n")
            target = head.split(b" ", 2)[1].decode()
            name = target.rsplit("/", 1)[-1]
            key = next((line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                        if line.lower().startswith(b"sec-websocket-key:")), b"")
            self.received[target] = rest
            answer = ANSWERS.get(name, lambda key: b"HTTP/1.1 404 Not Found\r\n"
                                 b"Content-Length: 0\r\nConnection: close\r\n")
            conn.sendall(answer(key) + (b"\r\n" if name != "bare" else b""))
            try:
                while piece := conn.recv(65536):
                    self.received[target] += piece
            except OSError:
                pass
            self.closed.add(target)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture(scope="module")
def answering() -> Iterator[AnsweringUpstream]:
    upstream = AnsweringUpstream()
    yield upstream
    upstream.close()


FORGED = (b"GET /admin/secret HTTP/1.1\r\nHost: internal\r\n"
          b"X-Forwarded-For: 10.0.0.1\r\n\r\n")


def handshake(target: str, port: int) -> bytes:
    return (f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: chat\r\n\r\n").encode()


@contextmanager
def handshaken(port: int, target: str) -> Iterator[tuple[socket.socket, bytes]]:
    """A client socket that sent the handshake for `target`, and what it read up to the
    end of the answer's head (and maybe beyond)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(handshake(target, port))
        data = b""
        while b"\r\n\r\n" not in data:
            piece = sock.recv(65536)
            assert piece, f"closed before the head: {data!r}"
            data += piece
        yield sock, data


def send_then(port: int, target: str) -> tuple[bytes, bool]:
    """Handshake, read the answer head, send FORGED: (answer head, the proxy closed after)."""
    with handshaken(port, target) as (sock, data):
        head = data.partition(b"\r\n\r\n")[0]
        try:
            sock.sendall(FORGED)
            sock.settimeout(5)
            while sock.recv(65536):
                pass
            closed = True
        except ConnectionResetError:
            closed = True
        except TimeoutError:
            closed = False
    return head, closed


@pytest.mark.parametrize("answer", [a for a in ANSWERS if a != "good"])
def test_a_101_that_is_no_accept_is_a_502_and_nothing_is_spliced(
        make_proxy: MakeProxy, answering: AnsweringUpstream, answer: str, rid: str) -> None:
    proxy = make_proxy(upstream_url=answering.url)
    target = f"/{rid}/{answer}"
    head, closed = send_then(proxy.port, target)
    assert head.startswith(b"HTTP/1.1 502"), head
    assert closed  # the client connection is not kept for another request
    assert wait_until(lambda: target in answering.closed)  # nor the upstream's
    assert answering.received[target] == b""  # the client's next bytes never reached it


def test_a_real_accept_is_spliced(make_proxy: MakeProxy, answering: AnsweringUpstream,
                                  rid: str) -> None:
    """The control: the same upstream answering properly gets the client's bytes."""
    proxy = make_proxy(upstream_url=answering.url)
    target = f"/{rid}/good"
    with handshaken(proxy.port, target) as (sock, data):
        assert data.startswith(b"HTTP/1.1 101"), data
        sock.sendall(b"\x81\x85abcd" + bytes(b ^ b"abcd"[i % 4] for i, b in enumerate(b"hello")))
        assert wait_until(lambda: len(answering.received.get(target, b"")) >= 11)


# -- control frames (RFC 6455 5.5) -----------------------------------------------------------


def ws_frame(payload: bytes, opcode: int, *, fin: bool = True) -> bytes:
    """A client frame, masked with a zero key (so the payload shows as sent)."""
    size = len(payload)
    length = (bytes([0x80 | size]) if size < 126 else bytes([0x80 | 126]) + size.to_bytes(2, "big")
              if size < 65536 else bytes([0x80 | 127]) + size.to_bytes(8, "big"))
    return bytes([(0x80 if fin else 0) | opcode]) + length + b"\0\0\0\0" + payload


@pytest.mark.parametrize(("frame", "refused"), [
    (ws_frame(b"p" * 125, 0x9), False),
    (ws_frame(b"p" * 126, 0x9), True),
    (ws_frame(b"p" * 200 * 1024, 0x9), True),
    (ws_frame(b"p" * 200 * 1024, 0xA), True),
    (ws_frame(b"", 0x9, fin=False), True),
    (ws_frame(b"\x03\xe8" + b"r" * 200, 0x8), True),
])
def test_the_scanner_refuses_control_frames_rfc_6455_forbids(frame: bytes, refused: bool) -> None:
    data = ws_frame(b"hello", 0x1) + frame + ws_frame(b"after", 0x2)
    for cut in range(0, len(data), max(len(data) // 40, 1)):
        scanner = FrameScanner(1 << 40)  # any size limit: the rule holds anyway
        at = scanner.scan(data[:cut])
        if at is None:
            at = scanner.scan(data[cut:])
            at = None if at is None else at + cut
        assert (at is not None) == refused
        if refused:
            # (a header split across reads: its first bytes went already, no close frame)
            assert at == 11 or at == cut > 11 and not scanner.clean_cut
            assert scanner.refusal == (1002, "invalid control frame")


def test_a_200_kib_ping_is_never_relayed(make_proxy: MakeProxy, answering: AnsweringUpstream,
                                         rid: str, request: pytest.FixtureRequest) -> None:
    xfail_on_granian(request, "ws-big-ping")
    """The suspected item: the tunnel counted no control frame; now no pairing relays it."""
    proxy = make_proxy("--ws-max-size", "1048576", upstream_url=answering.url)
    target = f"/{rid}/good"
    ping = ws_frame(b"P" * 200 * 1024, 0x9)
    with handshaken(proxy.port, target) as (sock, data):
        assert data.startswith(b"HTTP/1.1 101"), data
        sock.sendall(ws_frame(b"before", 0x2))
        assert wait_until(lambda: (0x2, b"before") in frames(answering.received.get(target)))
        try:
            sock.sendall(ping)
        except OSError:
            pass  # closed by the proxy while the ping was still going out
        sock.settimeout(10)
        rest = data.partition(b"\r\n\r\n")[2]
        try:
            while piece := sock.recv(65536):
                rest += piece
        except ConnectionResetError:
            pass
    # The client got a close frame, if any, saying protocol error.
    assert rest[:1] in (b"", b"\x88") and (not rest or rest[2:4] == b"\x03\xea"), rest[:8]
    assert wait_until(lambda: target in answering.closed)
    assert [op for op, _ in frames(answering.received[target])] in ([0x2], [0x2, 0x8])
    assert b"PPPP" not in answering.received[target]


def frames(data: bytes | None) -> list[tuple[int, bytes]]:
    """(opcode, unmasked payload) of the whole frames in `data`."""
    out: list[tuple[int, bytes]] = []
    data = data or b""
    while len(data) >= 2:
        size, at = data[1] & 0x7F, 2
        if size >= 126:
            width = 2 if size == 126 else 8
            size, at = int.from_bytes(data[2:2 + width], "big"), 2 + width
        key = data[at:at + 4] if data[1] & 0x80 else b"\0\0\0\0"
        at += 4 if data[1] & 0x80 else 0
        if len(data) < at + size:
            break
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(data[at:at + size]))
        out.append((data[0] & 0x0F, payload))
        data = data[at + size:]
    return out


def test_raw_http_after_a_real_accept_never_reaches_the_upstream(
        make_proxy: MakeProxy, answering: AnsweringUpstream, rid: str) -> None:
    """Unmasked bytes are no client frame (RFC 6455 5.1): the WSGI tunnel spliced
    `GET /admin/secret HTTP/1.1` to the upstream as is; now it closes 1002, as the
    ASGI face (websockets) does."""
    proxy = make_proxy(upstream_url=answering.url)
    target = f"/{rid}/good"
    with handshaken(proxy.port, target) as (sock, data):
        assert data.startswith(b"HTTP/1.1 101"), data
        sock.sendall(ws_frame(b"before", 0x2))
        assert wait_until(lambda: (0x2, b"before") in frames(answering.received.get(target)))
        sock.sendall(FORGED)
        assert wait_until(lambda: target in answering.closed)
    assert b"/admin/secret" not in answering.received[target]
    assert [op for op, _ in frames(answering.received[target])] in ([0x2], [0x2, 0x8])


@pytest.mark.parametrize(("frame", "to_server"), [
    (b"\x81\x05hello", True),            # a client frame not masked
    (ws_frame(b"hello", 0x1), False),      # a server frame masked
    (ws_frame(b"x", 0x3), True),           # reserved data opcode
    (ws_frame(b"x", 0xB), True),           # reserved control opcode
])
def test_the_scanner_refuses_what_is_no_frame(frame: bytes, to_server: bool) -> None:
    scanner = FrameScanner(1 << 40, masked=to_server)
    good = ws_frame(b"ok", 0x2) if to_server else b"\x82\x02ok"
    assert scanner.scan(good + frame) == len(good)
    assert scanner.refusal == (1002, "invalid frame")
    assert FrameScanner(1 << 40, masked=to_server).scan(good + good) is None
