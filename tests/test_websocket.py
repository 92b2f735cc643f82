"""WebSocket through the proxy, every pairing, against the suite's own WebSocket upstream.

The client side is the `websockets` sync client (and a raw socket where a test
needs to vanish); the upstream (tests/ws_upstream.py) records each handshake
and how each socket ended. Timing bounds are generous liveness limits ("closed
within seconds"), not performance claims.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Close
from websockets.sync.client import ClientConnection, connect

from tests.conftest import MakeProxy, ProxyProcess, free_port, xfail_on_granian
from tests.ws_upstream import WsUpstream

pytestmark = pytest.mark.pairings

MiB = 1024 * 1024
TARGET = "/ws/a%2Fb?x=1&y="
STRICT = ("--timeout", "1", "--ws-max-size", "65536")


@pytest.fixture(scope="session")
def ws_upstream() -> Iterator[WsUpstream]:
    server = WsUpstream().start()
    yield server
    server.stop()


@pytest.fixture
def ws_proxy(make_proxy: MakeProxy, ws_upstream: WsUpstream) -> ProxyProcess:
    return make_proxy(upstream_url=ws_upstream.url)


def open_ws(proxy: ProxyProcess, target: str = "/echo", *, rid: str = "",
            script: str = "", headers: dict[str, str] | None = None,
            **options: object) -> ClientConnection:
    sent = dict(headers or {})
    if rid:
        sent["x-req-id"] = rid
    if script:
        sent["x-ws"] = script
    return connect(f"ws://127.0.0.1:{proxy.port}{target}", additional_headers=sent,
                   max_size=None, open_timeout=10, close_timeout=5, **options)  # type: ignore[arg-type]


def refusal(proxy: ProxyProcess, target: str = "/echo", **options: object) -> InvalidStatus:
    with pytest.raises(InvalidStatus) as info:
        open_ws(proxy, target, **options).close()  # type: ignore[arg-type]
    return info.value


def close_frame(ws: ClientConnection, timeout: float = 5.0) -> Close | None:
    """The close frame the client received (None: its connection just went)."""
    with pytest.raises(ConnectionClosed) as info:
        while True:
            ws.recv(timeout=timeout)
    return info.value.rcvd


# ------------------------------------------------------------------------- messages


def test_echo_text_and_binary(ws_proxy: ProxyProcess) -> None:
    with open_ws(ws_proxy) as ws:
        ws.send("héllo")
        assert ws.recv(timeout=5) == "héllo"
        ws.send(b"\x00\xffbin")
        assert ws.recv(timeout=5) == b"\x00\xffbin"
        ws.send(b"")
        assert ws.recv(timeout=5) == b""


def test_4mib_messages(ws_proxy: ProxyProcess) -> None:
    blob = os.urandom(4 * MiB)
    text = blob.hex()[:4 * MiB]
    with open_ws(ws_proxy) as ws:
        ws.send(blob)
        assert ws.recv(timeout=30) == blob
        ws.send(text)
        assert ws.recv(timeout=30) == text


def test_fragmented_messages_both_ways(ws_proxy: ProxyProcess) -> None:
    with open_ws(ws_proxy, script="fragments") as ws:
        assert ws.recv(timeout=5) == "fragmented"
        ws.send(iter([b"frag", b"men", b"ted"]))
        assert ws.recv(timeout=5) == b"fragmented"
        ws.send(iter(["a", "b", "c"]))
        assert ws.recv(timeout=5) == "abc"


def test_burst_of_2000_messages_in_order(ws_proxy: ProxyProcess) -> None:
    with open_ws(ws_proxy, script="send count=2000") as ws:
        assert [ws.recv(timeout=10) for _ in range(2000)] == [str(i) for i in range(2000)]
        for i in range(2000):
            ws.send(f"m{i}")
        assert [ws.recv(timeout=10) for _ in range(2000)] == [f"m{i}" for i in range(2000)]


def test_slow_client_slows_the_upstream(ws_proxy: ProxyProcess, ws_upstream: WsUpstream,
                                        rid: str) -> None:
    # Incompressible 1 MiB messages, no compression: only buffers sit in between.
    with open_ws(ws_proxy, rid=rid, script=f"big size={MiB} count=128",
                 compression=None) as ws:
        record = ws_upstream.record(rid)
        time.sleep(2)  # the client reads nothing: the proxy must stop reading the upstream
        assert record.messages_out < 100  # socket and relay buffers: tens of MiB, not all
        sizes = [len(ws.recv(timeout=20)) for _ in range(128)]
    assert sizes == [MiB] * 128 and record.messages_out == 128


def test_48_concurrent_sockets(make_proxy: MakeProxy, ws_upstream: WsUpstream) -> None:
    # gunicorn's gthread worker holds one thread per open socket (its default 32
    # would queue the last 16 handshakes); the other pairings ignore --threads here.
    ws_proxy = make_proxy("--threads", "64", upstream_url=ws_upstream.url)
    opened = threading.Barrier(48, timeout=30)

    def session(n: int) -> list[str]:
        with open_ws(ws_proxy, f"/echo/{n}") as ws:
            opened.wait()  # all 48 are open at once
            for i in range(5):
                ws.send(f"{n}:{i}")
            return [str(ws.recv(timeout=10)) for _ in range(5)]

    with ThreadPoolExecutor(48) as pool:
        results = list(pool.map(session, range(48)))
    assert results == [[f"{n}:{i}" for i in range(5)] for n in range(48)]


# ------------------------------------------------------------------------ handshake


def test_handshake_headers_and_byte_exact_target(ws_proxy: ProxyProcess,
                                                 ws_upstream: WsUpstream, rid: str) -> None:
    headers = {"Cookie": "session=abc", "Authorization": "Bearer tok", "X-Custom-A": "1",
               "X-Custom-B": "2", "Keep-Alive": "timeout=5", "Proxy-Authorization": "p",
               "X-Forwarded-For": "6.6.6.6"}
    with open_ws(ws_proxy, TARGET, rid=rid, headers=headers, origin="http://app.example") as ws:
        ws.send("x")
        ws.recv(timeout=5)
    record = ws_upstream.record(rid)
    assert record.target == TARGET
    assert record.header("host") == [ws_upstream.url.removeprefix("http://")]
    assert record.header("cookie") == ["session=abc"]
    assert record.header("authorization") == ["Bearer tok"]
    assert record.header("origin") == ["http://app.example"]
    names = [n.lower() for n, _ in record.headers]
    assert names.index("x-custom-a") < names.index("x-custom-b")
    assert record.header("keep-alive") == [] and record.header("proxy-authorization") == []
    assert record.header("x-forwarded-for") == ["127.0.0.1"]  # the client's own is dropped
    assert record.header("x-forwarded-proto") == ["http"]
    assert [v.lower() for v in record.header("upgrade")] == ["websocket"]
    assert record.header("sec-websocket-version") == ["13"]
    assert len(record.header("sec-websocket-key")) == 1


def test_subprotocols_offered_as_sent_and_choice_returned(ws_proxy: ProxyProcess,
                                                         ws_upstream: WsUpstream,
                                                         rid: str) -> None:
    with open_ws(ws_proxy, rid=rid, script="proto name=superchat",
                 subprotocols=["chat", "superchat"]) as ws:
        assert ws.subprotocol == "superchat"
    assert ws_upstream.record(rid).header("sec-websocket-protocol") == ["chat, superchat"]
    with open_ws(ws_proxy, subprotocols=["chat"]) as ws:
        assert ws.subprotocol is None


def test_upstream_refusal_status_and_body_relayed(ws_proxy: ProxyProcess) -> None:
    exc = refusal(ws_proxy, script="refuse status=418 body=teapot")
    assert exc.response.status_code == 418
    assert bytes(exc.response.body) == b"teapot"
    assert exc.response.headers.get("x-refused") == "yes"
    assert refusal(ws_proxy, script="refuse status=401 body=who").response.status_code == 401


def test_dead_upstream_refused_before_open(make_proxy: MakeProxy) -> None:
    dead = make_proxy(upstream_url=f"http://127.0.0.1:{free_port()}")
    exc = refusal(dead)
    assert exc.response.status_code == 502
    assert exc.response.headers.get("content-type") == "application/problem+json"
    assert b'"status":502' in bytes(exc.response.body)


def test_handshake_timeout_is_504(make_proxy: MakeProxy, ws_upstream: WsUpstream) -> None:
    strict = make_proxy(*STRICT, upstream_url=ws_upstream.url)
    exc = refusal(strict, script="stall seconds=3")
    assert exc.response.status_code == 504
    assert exc.response.headers.get("content-type") == "application/problem+json"


def test_mount_prefix(make_proxy: MakeProxy, ws_upstream: WsUpstream, rid: str) -> None:
    mounted = make_proxy("--mount", "/ws", upstream_url=ws_upstream.url + "/base")
    with open_ws(mounted, TARGET, rid=rid) as ws:
        ws.send("in")
        assert ws.recv(timeout=5) == "in"
    assert ws_upstream.record(rid).target == "/base/a%2Fb?x=1&y="
    assert refusal(mounted, "/wsx/a").response.status_code == 404


# ---------------------------------------------------------------------------- close


def test_close_codes_and_reasons_both_ways(ws_proxy: ProxyProcess, ws_upstream: WsUpstream,
                                           rid: str, request: pytest.FixtureRequest) -> None:
    xfail_on_granian(request, "ws-close-reason")
    with open_ws(ws_proxy, rid=rid) as ws:
        ws.send("hi")
        ws.recv(timeout=5)
        ws.close(4001, "client bye")
    record = ws_upstream.wait_closed(rid)
    assert (record.close_code, record.close_reason) == (4001, "client bye")
    with open_ws(ws_proxy, script="close code=4002 reason='upstream bye'") as ws:
        frame = close_frame(ws)
    assert frame is not None and (frame.code, frame.reason) == (4002, "upstream bye")


def test_frames_reaching_the_upstream_are_masked(ws_proxy: ProxyProcess,
                                                 ws_upstream: WsUpstream, rid: str) -> None:
    with open_ws(ws_proxy, rid=rid) as ws:
        ws.send(b"m" * 1000)
        assert ws.recv(timeout=5) == b"m" * 1000
    assert ws_upstream.record(rid).first_frame_masked is True


def test_quiet_socket_outlives_timeout(make_proxy: MakeProxy, ws_upstream: WsUpstream) -> None:
    strict = make_proxy(*STRICT, upstream_url=ws_upstream.url)  # --timeout 1
    with open_ws(strict) as ws:
        time.sleep(2.5)
        ws.send("still here")
        assert ws.recv(timeout=5) == "still here"


def test_idle_limit_closes_a_silent_socket(make_proxy: MakeProxy,
                                           ws_upstream: WsUpstream, rid: str) -> None:
    idle = make_proxy("--ws-idle-timeout", "1", upstream_url=ws_upstream.url)
    with open_ws(idle, rid=rid) as ws:
        ws.send("once")
        assert ws.recv(timeout=5) == "once"
        started = time.monotonic()
        frame = close_frame(ws, timeout=10)
        assert 0.5 < time.monotonic() - started < 5
    assert frame is not None and frame.code == 1001
    record = ws_upstream.wait_closed(rid)
    assert record.closed_at is not None and record.close_code == 1001


def test_message_over_the_max_closes_1009(make_proxy: MakeProxy, ws_upstream: WsUpstream,
                                          rid: str) -> None:
    strict = make_proxy(*STRICT, upstream_url=ws_upstream.url)  # --ws-max-size 65536
    # Incompressible: the WSGI tunnel passes permessage-deflate through and can only
    # count wire sizes (compressed 100 kB of one byte would be a few hundred bytes).
    fits, too_big = os.urandom(60000), os.urandom(100000)
    with open_ws(strict, rid=rid) as ws:
        ws.send(fits)
        assert ws.recv(timeout=5) == fits
        ws.send(too_big)
        frame = close_frame(ws)
    assert frame is not None and frame.code == 1009
    record = ws_upstream.wait_closed(rid)
    assert record.messages_in == 1  # the oversized message stopped at the proxy
    assert record.close_code == 1009
    with open_ws(strict, script="big size=100000") as ws:
        frame = close_frame(ws)
    assert frame is not None and frame.code == 1009


def raw_handshake(port: int, rid: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"GET /echo HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                 "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 f"Sec-WebSocket-Version: 13\r\nx-req-id: {rid}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, f"no handshake answer: {head!r}"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def test_client_vanishing_closes_the_upstream(ws_proxy: ProxyProcess,
                                              ws_upstream: WsUpstream, rid: str) -> None:
    sock = raw_handshake(ws_proxy.port, rid)
    record = ws_upstream.record(rid)
    # No close frame: the TCP connection just goes (RST).
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    gone = time.monotonic()
    sock.close()
    ws_upstream.wait_closed(rid, timeout=10)
    assert record.closed_at is not None and record.closed_at - gone < 5


def test_upstream_vanishing_closes_the_client(ws_proxy: ProxyProcess) -> None:
    with open_ws(ws_proxy, script="vanish after=1") as ws:
        ws.send("last")
        started = time.monotonic()
        with pytest.raises(ConnectionClosed):
            while True:
                ws.recv(timeout=10)
        assert time.monotonic() - started < 5


def test_http_still_served_afterwards(ws_proxy: ProxyProcess) -> None:
    with open_ws(ws_proxy) as ws:
        ws.send("one")
        assert ws.recv(timeout=5) == "one"
    resp = httpx.get(f"{ws_proxy.url}/plain/a%2Fb?q=1", timeout=10)
    assert resp.status_code == 200 and resp.text == "/plain/a%2Fb?q=1"
    with open_ws(ws_proxy) as ws:
        ws.send("two")
        assert ws.recv(timeout=5) == "two"
