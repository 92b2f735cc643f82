"""The chaos upstream: raw asyncio sockets that misbehave on request and record hashes.

Every request names what the upstream does in `x-chaos-up: NAME key=value ...` and carries
the harness's id in `x-chaos-id`; every answer echoes the id. Per request the upstream
records the sha256 of the body it received (and whether its framing ended) and of the body
it sent (and whether it was all written and ended cleanly: no RST, the final chunk sent).
Per connection it records when it opened, closed, what it is busy with, and when the
upstream itself closed it (an idle close), so leaks and stale reuse are visible from here.

HTTP behaviours (the harness draws them; `idle=S` on any keep-alive answer closes the
connection with a FIN after S seconds without a next request):

  ok size=N framing=cl|chunked|close [status=200] [trailers=N]
  status code=N                 a small answer (204 and 304 bodiless)
  early size=N then=close|drain answer before reading the upload, then close or read it
  early-endless                 answer at once (upload unread) with an endless stream
  endless                       read the upload, then an endless chunked stream
  reset at=K where=head|body framing=...   K bytes of the head or body, then RST
  close-rst size=N              a close-delimited body, all of it, then RST (not FIN)
  stall-head seconds=S          wait S before the head
  trickle-head interval=S       the head a byte at a time
  stall-body at=K seconds=S     K body bytes, a pause, the rest
  trailers-endless              a chunked body, then trailer fields without end

WebSocket behaviours: ws-ok, ws-bad-accept, ws-no-upgrade, ws-101-reset, ws-refuse.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

HEAD_LIMIT = 1 << 20
PIECE = 64 * 1024
ENDLESS_CAP = 900.0          # seconds an "endless" answer goes on if nobody stops it
ENDLESS_PIECE = 8 * 1024
ENDLESS_PAUSE = 0.02
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@dataclass
class Exchange:
    """One request as the upstream saw it and what it answered."""

    rid: str | None
    behaviour: str
    conn: int
    method: str
    target: str
    t_head: float
    error: str | None = None
    req_len: int = 0
    req_sha: str = hashlib.sha256().hexdigest()
    req_complete: bool = False
    status: int | None = None
    resp_len: int = 0
    resp_sha: str = hashlib.sha256().hexdigest()
    resp_complete: bool = False   # every body byte and the framing's end were written
    resp_clean: bool = False      # ... and the connection was not reset after
    stale: float | None = None    # seconds since the upstream's FIN when this arrived


@dataclass
class Conn:
    """One connection from the proxy."""

    n: int
    opened: float
    closed: float | None = None
    busy: str | None = None       # what it is doing; None while idle between requests
    rid: str | None = None
    behaviour: str = ""
    since: float = 0.0
    fin_at: float | None = None   # the upstream closed it (idle) at this time
    exchanges: list[Exchange] = field(default_factory=list)


class _Bad(Exception):
    """The proxy sent something that is not HTTP/1.1."""


class _Reset(Exception):
    """The behaviour ended the connection with an RST."""


def _block(rid: str) -> bytes:
    return random.Random(rid).randbytes(4096) * 16


def spec_of(header: str) -> tuple[str, dict[str, str]]:
    words = header.split()
    name = words[0] if words else "ok"
    return name, {k: v for k, _, v in (w.partition("=") for w in words[1:])}


class ChaosUpstream:
    """`ChaosUpstream().start()`; `.port`; `.exchanges()`, `.conns()`; `stop()`."""

    def __init__(self) -> None:
        self.port = 0
        self._lock = threading.Lock()
        self._conns: list[Conn] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> ChaosUpstream:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="chaos-upstream",
                                        daemon=True)
        self._thread.start()

        async def bind() -> asyncio.Server:
            return await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=HEAD_LIMIT,
                                              backlog=1024)

        self._server = asyncio.run_coroutine_threadsafe(bind(), loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()
            self._loop = self._thread = None

    # -- inspection (any thread)

    def conns(self) -> list[Conn]:
        with self._lock:
            return list(self._conns)

    def exchanges(self) -> list[Exchange]:
        with self._lock:
            return [ex for c in self._conns for ex in c.exchanges]

    def open_conns(self) -> list[Conn]:
        return [c for c in self.conns() if c.closed is None]

    # -- serving (the loop thread)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            conn = Conn(len(self._conns), time.monotonic())
            self._conns.append(conn)
        idle: float | None = None
        try:
            while True:
                conn.busy, conn.rid, conn.behaviour = None, None, ""
                head = await self._next_head(reader, writer, conn, idle)
                if head is None:
                    break
                conn.busy, conn.since = "answering", time.monotonic()
                ex, headers = self._parse(conn, head)
                with self._lock:
                    conn.exchanges.append(ex)
                conn.rid, conn.behaviour = ex.rid, ex.behaviour
                if ex.stale is not None:
                    raise _Reset  # a closed server would have reset it
                keep = await self._answer(reader, writer, conn, ex, headers)
                if not keep:
                    break
                idle = float(spec_of(ex.behaviour)[1].get("idle", 0)) or None
        except _Reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        except (_Bad, ValueError) as exc:  # ValueError: a Content-Length not a number
            if conn.exchanges:
                conn.exchanges[-1].error = str(exc)
            else:
                with self._lock:
                    conn.exchanges.append(Exchange(None, "", conn.n, "", "", time.monotonic(),
                                                   error=str(exc)))
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                asyncio.CancelledError):
            pass
        finally:
            writer.close()
            conn.closed = time.monotonic()
            self._tasks.discard(task)

    async def _next_head(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         conn: Conn, idle: float | None) -> bytes | None:
        """The next request head; after `idle` quiet seconds the upstream sends its FIN and
        then only waits for the proxy to close (a request arriving later is stale)."""
        if idle is not None:
            try:
                return await asyncio.wait_for(self._head(reader), idle)
            except asyncio.TimeoutError:
                if not reader._buffer:  # type: ignore[attr-defined]  # (no head on its way)
                    writer.write_eof()
                    conn.fin_at = time.monotonic()
        return await self._head(reader)

    @staticmethod
    async def _head(reader: asyncio.StreamReader) -> bytes | None:
        """A head, or None at the end (a head cut by the proxy's close is not a request)."""
        try:
            return await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None

    @staticmethod
    def _parse(conn: Conn, head: bytes) -> tuple[Exchange, dict[str, str]]:
        lines = head[:-4].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        headers: dict[str, str] = {}
        error = None if len(parts) == 3 and parts[2] == "HTTP/1.1" else \
            f"bad request line {lines[0][:80]!r}"
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon or not name or name != name.strip():
                error = error or f"bad header line {line[:80]!r}"
            key = name.strip().lower()
            if key in headers and key in ("content-length", "x-chaos-id", "x-chaos-up"):
                error = error or f"repeated {key}"
            headers[key] = value.strip()
        now = time.monotonic()
        ex = Exchange(headers.get("x-chaos-id"), headers.get("x-chaos-up", "ok"), conn.n,
                      parts[0], parts[1] if len(parts) > 1 else "", now, error=error)
        if conn.fin_at is not None:
            ex.stale = now - conn.fin_at
        if error is not None:
            raise _Bad(error)
        return ex, headers

    # -- request bodies

    async def _read_body(self, reader: asyncio.StreamReader, ex: Exchange,
                         headers: dict[str, str]) -> None:
        digest = hashlib.sha256()

        async def take(size: int) -> None:
            """`size` body bytes, hashed as they come."""
            while size:
                data = await reader.read(min(size, PIECE))
                if not data:
                    raise asyncio.IncompleteReadError(b"", size)
                size -= len(data)
                digest.update(data)
                ex.req_len += len(data)
                ex.req_sha = digest.hexdigest()

        if "chunked" in headers.get("transfer-encoding", "").lower():
            if "content-length" in headers:
                raise _Bad("both Transfer-Encoding and Content-Length")
            while True:
                line = await reader.readuntil(b"\r\n")
                try:
                    size = int(line[:-2].split(b";")[0], 16)
                except ValueError:
                    raise _Bad(f"bad chunk size line {line[:40]!r}") from None
                if size == 0:
                    while await reader.readuntil(b"\r\n") != b"\r\n":
                        pass
                    break
                await take(size)
                if await reader.readexactly(2) != b"\r\n":
                    raise _Bad("chunk not followed by CRLF")
        elif "content-length" in headers:
            await take(int(headers["content-length"]))
        ex.req_complete = True

    # -- answers

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      conn: Conn, ex: Exchange, headers: dict[str, str]) -> bool:
        name, p = spec_of(ex.behaviour)
        if name.startswith("ws-"):
            return await self._websocket(reader, writer, conn, ex, headers, name)
        if name in ("early", "early-endless"):
            conn.busy = "answering early"
        else:
            conn.busy = "reading the upload"
            await self._read_body(reader, ex, headers)
            conn.busy = "answering"
        size = int(p.get("size", 0))
        body = _Body(ex, size)
        if name == "early":
            await body.send(writer, "cl")
            if p.get("then") == "drain":
                await self._read_body(reader, ex, headers)
                return True
            return False
        if name in ("early-endless", "endless"):
            await body.endless(writer)
            return False
        if name == "status":
            code = int(p.get("code", 404))
            await body.send(writer, "none" if code in (204, 304) else "cl", status=code)
            return True
        if name == "reset":
            await body.send(writer, p.get("framing", "cl"),
                            reset_at=int(p.get("at", 0)), in_head=p.get("where") == "head")
            raise _Reset
        if name == "close-rst":
            await body.send(writer, "close")
            ex.resp_complete = False  # the end of a close-delimited body was an RST
            raise _Reset
        if name == "stall-head":
            await asyncio.sleep(float(p.get("seconds", 1)))
        if name == "stall-body":
            await body.send(writer, p.get("framing", "cl"), pause_at=int(p.get("at", 0)),
                            pause=float(p.get("seconds", 1)))
            return True
        if name == "trickle-head":
            await body.send(writer, "cl", trickle=float(p.get("interval", 0.1)))
            return True
        if name == "trailers-endless":
            await body.send(writer, "chunked", endless_trailers=True)
            return False
        framing = p.get("framing", "cl")
        await body.send(writer, framing, status=int(p.get("status", 200)),
                        trailers=int(p.get("trailers", 0)))
        if framing == "close":
            writer.write_eof()
            await writer.drain()
            ex.resp_clean = ex.resp_complete
            conn.busy = "waiting for the proxy to close after a close-delimited body"
            await reader.read()
            return False
        return True

    async def _websocket(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         conn: Conn, ex: Exchange, headers: dict[str, str], name: str) -> bool:
        key = headers.get("sec-websocket-key", "").encode()
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest()).decode()
        rid = ex.rid or ""
        if name == "ws-refuse":
            await _Body(ex, 100).send(writer, "cl", status=403)
            return True
        lines = ["HTTP/1.1 101 Switching Protocols"]
        if name != "ws-no-upgrade":
            lines += ["Upgrade: websocket", "Connection: Upgrade"]
        if name == "ws-bad-accept":
            accept = base64.b64encode(b"not the accept value").decode()
        lines += [f"Sec-WebSocket-Accept: {accept}", f"x-chaos-id: {rid}", "", ""]
        writer.write("\r\n".join(lines).encode())
        await writer.drain()
        ex.status = 101
        if name == "ws-101-reset":
            raise _Reset
        conn.busy = "websocket"
        while True:  # frames until a close frame or the end; pings answered
            first = await reader.readexactly(2)
            length = first[1] & 0x7F
            if length == 126:
                length = struct.unpack("!H", await reader.readexactly(2))[0]
            elif length == 127:
                length = struct.unpack("!Q", await reader.readexactly(8))[0]
            mask = await reader.readexactly(4) if first[1] & 0x80 else b""
            payload = await reader.readexactly(length)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            opcode = first[0] & 0x0F
            if opcode == 0x8:
                writer.write(b"\x88\x02\x03\xe8")
                await writer.drain()
                return False
            if opcode == 0x9 and length < 126:
                writer.write(bytes([0x8A, length]) + payload)
                await writer.drain()


class _Body:
    """Writes one answer for an exchange, hashing the body it writes."""

    def __init__(self, ex: Exchange, size: int) -> None:
        self.ex = ex
        self.size = size
        self.block = _block(ex.rid or "")
        self.digest = hashlib.sha256()

    def head(self, status: int, framing: str, extra: list[str] | None = None) -> bytes:
        lines = [f"HTTP/1.1 {status} Chaos", f"x-chaos-id: {self.ex.rid}",
                 "Content-Type: application/octet-stream"]
        if framing == "cl":
            lines.append(f"Content-Length: {self.size}")
        elif framing == "chunked":
            lines.append("Transfer-Encoding: chunked")
        elif framing == "close":
            lines.append("Connection: close")
        lines += extra or []
        self.ex.status = status
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def _account(self, data: bytes) -> None:
        self.digest.update(data)
        self.ex.resp_len += len(data)
        self.ex.resp_sha = self.digest.hexdigest()

    async def send(self, writer: asyncio.StreamWriter, framing: str, *, status: int = 200,
                   trailers: int = 0, reset_at: int | None = None, in_head: bool = False,
                   pause_at: int | None = None, pause: float = 0.0, trickle: float = 0.0,
                   endless_trailers: bool = False) -> None:
        """The head and the body of `size` bytes in `framing` (cl, chunked, close, none)."""
        if framing == "none":
            self.size = 0
        head = self.head(status, framing, ["Trailer: x-chaos-sum"] if trailers else None)
        if in_head and reset_at is not None:
            writer.write(head[:reset_at % len(head)])
            await writer.drain()
            return
        if trickle:
            for i in range(len(head)):
                writer.write(head[i:i + 1])
                await writer.drain()
                await asyncio.sleep(trickle)
        else:
            writer.write(head)
        offset = 0
        end = self.size if reset_at is None else min(reset_at, self.size)
        while offset < end:
            step = min(PIECE, end - offset)
            if pause_at is not None and offset < pause_at <= offset + step:
                step = max(1, pause_at - offset)
            start = offset % len(self.block)
            data = (self.block[start:] + self.block)[:step]
            writer.write(b"%x\r\n%s\r\n" % (step, data) if framing == "chunked" else data)
            self._account(data)
            offset += step
            await writer.drain()
            if pause_at is not None and offset == pause_at:
                await asyncio.sleep(pause)
        if reset_at is not None:
            await writer.drain()
            return
        if framing == "chunked":
            if endless_trailers:
                writer.write(b"0\r\n")
                deadline = time.monotonic() + ENDLESS_CAP
                i = 0
                while time.monotonic() < deadline:
                    writer.write(b"x-chaos-trailer-%d: %s\r\n" % (i, b"t" * 1000))
                    i += 1
                    await writer.drain()
                    await asyncio.sleep(ENDLESS_PAUSE / 4)
                return
            fields = b"".join(b"x-chaos-sum-%d: %d\r\n" % (i, i) for i in range(trailers))
            writer.write(b"0\r\n" + fields + b"\r\n")
        # Written whole once it left this process: the proxy may read it all and close
        # before a drain returns (and the drain then raises).
        self.ex.resp_complete = writer.transport.get_write_buffer_size() == 0
        self.ex.resp_clean = self.ex.resp_complete and framing != "close"
        await writer.drain()
        self.ex.resp_complete = True
        self.ex.resp_clean = framing != "close"

    async def endless(self, writer: asyncio.StreamWriter) -> None:
        """A chunked stream that only ends when the peer goes (or after ENDLESS_CAP)."""
        writer.write(self.head(200, "chunked"))
        deadline = time.monotonic() + ENDLESS_CAP
        data = self.block[:ENDLESS_PIECE]
        while time.monotonic() < deadline:
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            self._account(data)
            await writer.drain()
            await asyncio.sleep(ENDLESS_PAUSE)
