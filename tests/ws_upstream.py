"""A recording WebSocket upstream (the `websockets` asyncio server) for the WebSocket tests.

It records each handshake (raw target, headers in order and case, the chosen
subprotocol), whether the first frame that reached it was masked, how the
socket ended (the close code and reason it received, or none when the peer
vanished) and when its TCP connection closed. Records are found by the
`x-req-id` request header.

The request header `x-ws: <action> key=value ...` scripts it; the default echoes
every message back as it came (text as text, binary as binary):

  refuse status=N body=TEXT   answer the handshake with that status and body
  close code=N reason=TEXT    close right after the handshake
  vanish [after=N]            drop TCP without a close frame after N messages (default 0)
  send count=N                send text messages "0".."N-1", then echo
  big size=N [count=M]        send M (default 1) binary messages of N random bytes, then echo
  fragments                   send the text "fragmented" in three frames, then echo
  proto name=X                choose subprotocol X (when offered)
  stall seconds=S             answer the handshake only after S seconds

A plain HTTP GET (no Upgrade) gets 200 with its raw target as the body.
Runs on its own asyncio loop in a daemon thread.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import ssl as ssl_module
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve, unix_serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.typing import Subprotocol


@dataclass
class WsRecord:
    """What one handshake (and the socket after it) looked like from the upstream."""

    rid: str
    target: str
    headers: list[tuple[str, str]]
    opened_at: float = field(default_factory=time.monotonic)
    subprotocol: str | None = None
    first_frame_masked: bool | None = None
    messages_in: int = 0
    messages_out: int = 0               # scripted messages the upstream has sent so far
    close_code: int | None = None       # None: no close frame came (the peer vanished)
    close_reason: str | None = None
    closed_at: float | None = None      # when the TCP connection was gone

    def header(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]


def _script(request: Request) -> tuple[str, dict[str, str]]:
    words = shlex.split(request.headers.get("x-ws", "echo"))
    action = words[0] if words else "echo"
    args = dict(word.partition("=")[::2] for word in words[1:])
    return action, args


class _RecordingConnection(ServerConnection):
    record: WsRecord | None = None

    def data_received(self, data: bytes) -> None:
        record = self.record
        if (record is not None and record.first_frame_masked is None
                and self.protocol.state is State.OPEN and len(data) >= 2):
            record.first_frame_masked = bool(data[1] & 0x80)
        super().data_received(data)


class WsUpstream:
    """`ssl`: serve wss with this server context; `unix`: listen on this socket path."""

    def __init__(self, *, ssl: ssl_module.SSLContext | None = None,
                 unix: str | None = None) -> None:
        self.ssl = ssl
        self.unix = unix
        self.records: dict[str, WsRecord] = {}
        self._loop = asyncio.new_event_loop()
        self._server: Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        if self.unix is not None:
            return f"unix:{self.unix}"
        return f"{'https' if self.ssl is not None else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> WsUpstream:
        ready = threading.Event()

        async def open_server() -> Server:
            options: dict[str, Any] = {
                "process_request": self._process_request, "select_subprotocol": self._select,
                "max_size": None, "create_connection": _RecordingConnection,
                "server_header": None}
            if self.unix is not None:
                return await unix_serve(self._handler, self.unix, **options)
            return await serve(self._handler, "127.0.0.1", 0, ssl=self.ssl, **options)

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._server = self._loop.run_until_complete(open_server())
            if self.unix is None:
                self.port = next(iter(self._server.sockets)).getsockname()[1]
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="ws-upstream", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the WebSocket upstream did not start")
        return self

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop.close()

    def record(self, rid: str, timeout: float = 5.0) -> WsRecord:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if rid in self.records:
                return self.records[rid]
            time.sleep(0.01)
        raise AssertionError(f"the WebSocket upstream never saw {rid}")

    def wait_closed(self, rid: str, timeout: float = 5.0) -> WsRecord:
        record = self.record(rid, timeout)
        deadline = time.monotonic() + timeout
        while record.closed_at is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return record

    async def _process_request(self, connection: ServerConnection, request: Request
                               ) -> Response | None:
        if "upgrade" not in request.headers:
            return connection.respond(200, request.path)
        rid = request.headers.get("x-req-id", "")
        record = WsRecord(rid=rid, target=request.path,
                          headers=list(request.headers.raw_items()))
        if rid:
            self.records[rid] = record
        assert isinstance(connection, _RecordingConnection)
        connection.record = record
        action, args = _script(request)
        if action == "refuse":
            response = connection.respond(int(args.get("status", "403")),
                                          args.get("body", "refused"))
            response.headers["X-Refused"] = "yes"
            return response
        if action == "stall":
            await asyncio.sleep(float(args.get("seconds", "30")))
        return None

    def _select(self, connection: ServerConnection, offered: Any) -> Subprotocol | None:
        action, args = _script(connection.request) if connection.request else ("", {})
        name = args.get("name")
        chosen = Subprotocol(name) if action == "proto" and name in offered else None
        if isinstance(connection, _RecordingConnection) and connection.record is not None:
            connection.record.subprotocol = chosen
        return chosen

    async def _handler(self, connection: ServerConnection) -> None:
        assert isinstance(connection, _RecordingConnection) and connection.request
        record = connection.record
        action, args = _script(connection.request)
        try:
            await self._run(connection, record, action, args)
        except ConnectionClosed as exc:
            if record is not None and exc.rcvd is not None:
                record.close_code, record.close_reason = exc.rcvd.code, exc.rcvd.reason
        finally:
            await connection.wait_closed()
            if record is not None:
                record.closed_at = time.monotonic()

    async def _run(self, connection: ServerConnection, record: WsRecord | None, action: str,
                   args: dict[str, str]) -> None:
        if action == "close":
            await connection.close(int(args.get("code", "1000")), args.get("reason", ""))
            return
        if action == "send":
            for i in range(int(args.get("count", "1"))):
                await connection.send(str(i))
        elif action == "big":
            block = os.urandom(int(args.get("size", "1")))
            for _ in range(int(args.get("count", "1"))):
                await connection.send(block)
                if record is not None:
                    record.messages_out += 1
        elif action == "fragments":
            await connection.send(iter(["frag", "men", "ted"]))
        vanish_after = int(args["after"]) if action == "vanish" else -1
        received = 0
        while True:
            if received == vanish_after:
                connection.transport.abort()
                await connection.wait_closed()
                return
            message = await connection.recv()
            received += 1
            if record is not None:
                record.messages_in += 1
            await connection.send(message)
