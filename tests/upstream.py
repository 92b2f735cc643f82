"""A recording HTTP/1.1 upstream: parses raw bytes itself and records exactly what arrived.

Tests put it behind the proxy and then check the `Record` of each request: raw target,
headers in order and case, framing, body length and hash, and whether the body ended cleanly.
The parser is strict on purpose (no h11/httptools leniency) so that a proxy that smuggles,
reframes or truncates is caught: a bad request line, header line, Content-Length or chunk line
is recorded with `error` set and answered 400 with the connection closed.

The request header `x-upstream: <action> key=value ...` chooses the answer (values split with
shell rules, so `body="two words"` works); every answer echoes `x-req-id`, except `raw`:

  echo                      200 JSON of what arrived (the default)
  download size=N [chunked=1] [chunk=65536] [gate=NAME] [gzip=1] [text=1] [ctype=...] [cc=...]
                            text=1: `text_bytes(N)` (compressible) instead of the pattern;
                            cc: its Cache-Control value
  sse count=N interval=S [gate=NAME]   events `data: event-<i>` for i = 0..N-1, the first
                            at once; gate: after event i, wait for gate NAME-i instead
  status code=N [location=URL] [body=TEXT] [early=1]   early: answer before reading the
                            body, then close
  headers [status=200]      response headers from the JSON list in `x-upstream-headers`
  raw [close=1]             write base64-decoded `x-upstream-raw` as the whole response
  pieces [chunked=1] [interval=S] [ctype=...] [encoding=...]   the body from
                            `x-upstream-pieces` (a JSON list of base64 strings), one write
                            each, S seconds apart (0.2); Content-Length unless chunked=1
  hang [seconds=120]        never answer; close once the client does
  reset                     RST right after the head
  cut size=N after=M [chunked=1] [chunk=65536] [ctype=...] [cc=...]   announce N bytes,
                            send M, close (FIN); cc: its Cache-Control value
  trickle size=N interval=S [chunk=1]
  slowread rate=BYTES_PER_SEC
  sleep seconds=S           read the body, wait, then echo
  close                     echo with `Connection: close`

Runs on its own asyncio loop in a daemon thread; stdlib only.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import gzip
import hashlib
import json
import logging
import random
import re
import shlex
import socket
import ssl as ssl_module
import struct
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

__all__ = ["Gate", "Record", "Upstream", "gzip_pattern", "pattern_bytes", "pattern_sha256",
           "text_bytes"]

log = logging.getLogger(__name__)

BLOCK = 64 * 1024
BODY_KEEP_LIMIT = 1 << 20      # Record.body is kept up to this size
HEAD_LIMIT = 1 << 20           # a request head larger than this is dropped unrecorded
LINE_LIMIT = 64 * 1024         # chunk-size and trailer lines
READ_HIGH = 4 << 20            # pause reading the socket above this many buffered bytes
READ_LOW = 1 << 20
WRITE_PIECE = 1 << 20          # largest single transport.write of a generated body

TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")
DIGITS = re.compile(rb"[0-9]+")
# RFC 9112 7.1: chunk-size is 1*HEXDIG, optionally followed by BWS and chunk extensions.
CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;.*)?")

# ---------------------------------------------------------------------------- content


@functools.cache
def _block() -> bytes:
    return random.Random(1234).randbytes(BLOCK)


@functools.cache
def _pattern_window() -> bytes:
    """The pattern repeated so any slice of up to WRITE_PIECE bytes at any offset exists."""
    return _block() * (WRITE_PIECE // BLOCK + 1)


def pattern_bytes(n: int) -> bytes:
    """Deterministic download content: a 64 KiB pseudo-random block repeated, cut to n."""
    return (_block() * (n // BLOCK + 1))[:n]


@functools.lru_cache(maxsize=64)
def pattern_sha256(n: int) -> str:
    """sha256 hex of `pattern_bytes(n)`, computed block by block (no n-byte buffer)."""
    digest = hashlib.sha256()
    window = memoryview(_pattern_window())
    left = n
    while left:
        step = min(left, WRITE_PIECE)
        digest.update(window[:step])
        left -= step
    return digest.hexdigest()


@functools.lru_cache(maxsize=8)
def text_bytes(n: int) -> bytes:
    """Deterministic compressible content (HTML-like lines of words), cut to n."""
    rng = random.Random(4321)
    words = ("proxy stream body chunk header upstream client filter route mount coding "
             "gzip brotli zstd event server worker pool").split()
    lines = []
    size = 0
    while size < n:
        line = f"<p id=\"{len(lines)}\">{' '.join(rng.choice(words) for _ in range(12))}</p>\n"
        lines.append(line)
        size += len(line)
    return "".join(lines).encode()[:n]


@functools.lru_cache(maxsize=8)
def gzip_pattern(n: int) -> bytes:
    """`pattern_bytes(n)` gzip-compressed, byte-stable across runs (mtime=0)."""
    return gzip.compress(pattern_bytes(n), compresslevel=1, mtime=0)


class _Source:
    """A response body to send in slices: the pattern of a size, or fixed bytes."""

    def __init__(self, size: int, data: bytes | None = None) -> None:
        self.size = size if data is None else len(data)
        self._data = memoryview(data) if data is not None else None

    def slice(self, offset: int, n: int) -> memoryview:
        """n (<= WRITE_PIECE) bytes at offset."""
        if self._data is not None:
            return self._data[offset:offset + n]
        start = offset % BLOCK
        return memoryview(_pattern_window())[start:start + n]


# ---------------------------------------------------------------------------- records


@dataclass
class Record:
    """One request as it arrived on the wire; body fields update live while it streams."""

    req_id: str | None
    conn_id: int
    method: str
    target: bytes
    http_version: str
    headers: list[tuple[bytes, bytes]]
    framing: str                    # "content-length" | "chunked" | "both" | "none"
    content_length: int | None
    body_length: int = 0
    body_sha256: str = hashlib.sha256().hexdigest()
    body: bytes = field(default=b"", repr=False)
    complete: bool = False
    aborted: bool = False
    t_head: float = 0.0
    t_first_body: float | None = None
    t_end: float | None = None
    error: str | None = None        # why the strict parser refused the request (answered 400)

    def header(self, name: str) -> str | None:
        """First value of a header, case-insensitive, or None."""
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        """Every value of a header, in arrival order."""
        key = name.lower().encode("latin-1")
        return [v.decode("latin-1") for k, v in self.headers if k.lower() == key]

    def header_names(self) -> list[str]:
        """Lower-cased header names in arrival order (duplicates kept)."""
        return [k.decode("latin-1").lower() for k, _ in self.headers]

    @property
    def final(self) -> bool:
        """The body ended or the connection died: `complete`/`aborted` no longer change."""
        return self.t_end is not None


class _PeerGone(Exception):
    """The client closed or reset the connection."""


class _BadRequest(Exception):
    """The request violates HTTP/1.1 framing; answered with 400 and a closed connection."""


# ---------------------------------------------------------------------------- gates


class Gate:
    """A threading.Event that the upstream's loop can also await (for `download gate=`)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def set(self) -> None:
        with self._lock:
            self._event.set()
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_resolve, fut)
            except RuntimeError:  # loop already closed
                pass

    def clear(self) -> None:
        self._event.clear()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)

    async def wait_async(self, timeout: float, gone: asyncio.Event) -> bool:
        """Wait on the loop until set, the timeout, or the client going away."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self._event.is_set():
                return True
            self._waiters.append((loop, fut))
        gone_task = asyncio.ensure_future(gone.wait())
        waiters: list[asyncio.Future[Any]] = [fut, gone_task]
        try:
            await asyncio.wait(waiters, timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone_task.cancel()
            fut.cancel()
        return self._event.is_set()


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


# ---------------------------------------------------------------------------- connection


class _Conn(asyncio.Protocol):
    """Buffers one client connection and offers the few awaitable reads the parser needs."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.conn_id = 0
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.eof = False                 # peer sent FIN (or connection lost)
        self.lost = False                # transport is gone
        self.gone = asyncio.Event()      # set on FIN or loss: the client went away
        self.read_high = READ_HIGH
        self._paused = False
        self._data_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self.task: asyncio.Task[None] | None = None

    # protocol callbacks (loop thread)
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=4 << 20, low=1 << 20)
        self.conn_id = self.upstream._connection_made(self)
        self.task = asyncio.get_running_loop().create_task(self.upstream._serve(self))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self._paused and len(self.buf) > self.read_high and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self.gone.set()
        self._wake()
        # Keep the write side open: a half-closed client still gets its answer
        # (TLS has no half-close: asyncio closes there whatever is returned).
        return self.upstream.ssl is None

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = self.lost = True
        self.gone.set()
        self._wake()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        self.upstream._connection_lost(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def _wake(self) -> None:
        if self._data_waiter is not None and not self._data_waiter.done():
            self._data_waiter.set_result(None)

    # reads (the connection's one handler task)
    async def _more(self) -> None:
        """Wait for more bytes; raise _PeerGone if none can come."""
        if self.eof:
            raise _PeerGone
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        self._data_waiter = asyncio.get_running_loop().create_future()
        try:
            await self._data_waiter
        finally:
            self._data_waiter = None

    def _consumed(self) -> None:
        if self._paused and len(self.buf) < min(READ_LOW, self.read_high) \
                and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    async def read_until(self, sep: bytes, limit: int) -> bytes:
        """Bytes up to (not including) sep; sep is consumed."""
        start = 0
        while True:
            at = self.buf.find(sep, start)
            if at >= 0:
                data = bytes(self.buf[:at])
                del self.buf[:at + len(sep)]
                self._consumed()
                return data
            if len(self.buf) > limit:
                raise _BadRequest(f"no {sep!r} within {limit} bytes")
            start = max(0, len(self.buf) - len(sep) + 1)
            await self._more()

    async def read_head(self) -> bytes | None:
        """The next request head, or None if the client closed cleanly between requests."""
        if not self.buf and self.eof:
            return None
        try:
            return await self.read_until(b"\r\n\r\n", HEAD_LIMIT)
        except _PeerGone:
            return None

    async def read_some(self, n: int) -> bytes | bytearray:
        """Between 1 and n bytes."""
        while not self.buf:
            await self._more()
        if len(self.buf) <= n:
            data: bytes | bytearray = self.buf
            self.buf = bytearray()
        else:
            data = bytes(self.buf[:n])
            del self.buf[:n]
        self._consumed()
        return data

    async def read_exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            await self._more()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        self._consumed()
        return data

    # writes
    def write(self, data: bytes | memoryview) -> None:
        if self.lost or self.transport is None or self.transport.is_closing():
            raise _PeerGone
        self.transport.write(data)

    async def drain(self) -> None:
        if self.lost:
            raise _PeerGone
        if self._write_paused:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None
            if self.lost:
                raise _PeerGone

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def reset(self) -> None:
        """Close with RST instead of FIN (SO_LINGER 0)."""
        if self.transport is None or self.transport.is_closing():
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()


# ---------------------------------------------------------------------------- request bodies


class _BodyReader:
    """Reads one request body per its framing, updating the Record as bytes arrive."""

    def __init__(self, upstream: Upstream, conn: _Conn, rec: Record) -> None:
        self.upstream = upstream
        self.conn = conn
        self.rec = rec
        self.chunked = rec.framing in ("chunked", "both")
        self.left = 0 if self.chunked else (rec.content_length or 0)
        self.chunk_left = 0
        self.need_crlf = False
        self.done = rec.framing == "none" or (not self.chunked and self.left == 0)
        self._hash = hashlib.sha256()
        self._keep: bytearray | None = bytearray()

    async def read(self, n: int = WRITE_PIECE) -> bytes | bytearray:
        """Up to n body bytes; b"" once the body has ended."""
        if self.done:
            return b""
        if not self.chunked:
            data = await self.conn.read_some(min(n, self.left))
            self.left -= len(data)
            self._account(data)
            if self.left == 0:
                self._finish()
            return data
        while self.chunk_left == 0:
            if self.need_crlf:
                if await self.conn.read_exactly(2) != b"\r\n":
                    raise _BadRequest("chunk data not followed by CRLF")
                self.need_crlf = False
            line = await self.conn.read_until(b"\r\n", LINE_LIMIT)
            match = CHUNK_SIZE.fullmatch(line)
            if match is None:
                raise _BadRequest(f"bad chunk-size line {line[:80]!r}")
            size = int(match.group(1), 16)
            if size == 0:
                while await self.conn.read_until(b"\r\n", LINE_LIMIT):
                    pass  # trailer fields are consumed and ignored
                self._finish()
                return b""
            self.chunk_left = size
            self.need_crlf = True
        data = await self.conn.read_some(min(n, self.chunk_left))
        self.chunk_left -= len(data)
        self._account(data)
        return data

    async def read_all(self) -> None:
        while await self.read():
            pass

    def _account(self, data: bytes | bytearray) -> None:
        rec = self.rec
        if rec.t_first_body is None and data:
            rec.t_first_body = time.monotonic()
        self._hash.update(data)
        rec.body_length += len(data)
        rec.body_sha256 = self._hash.hexdigest()
        if self._keep is not None:
            if len(self._keep) + len(data) > BODY_KEEP_LIMIT:
                self._keep = None
            else:
                self._keep += data
                rec.body = bytes(self._keep)

    def _finish(self) -> None:
        self.done = True
        self.upstream._finalize(self.rec, complete=True)

    def abandon(self, error: str | None = None) -> None:
        """The body will never complete: the connection died, or the framing was bad."""
        if not self.done:
            self.done = True
            self.upstream._finalize(self.rec, complete=False, aborted=error is None,
                                    error=error)


# ---------------------------------------------------------------------------- the server


@dataclass
class _Request:
    rec: Record
    body: _BodyReader
    action: str
    params: dict[str, str]
    keep_alive: bool
    expect_continue: bool

    @property
    def head_only(self) -> bool:
        return self.rec.method == "HEAD"


class _BadAction(Exception):
    """x-upstream names an unknown action or bad parameters (answered 400)."""


def _int(params: dict[str, str], key: str, default: int | None = None) -> int:
    value = params.get(key)
    if value is None:
        if default is None:
            raise _BadAction(f"missing {key}=")
        return default
    try:
        return int(value)
    except ValueError:
        raise _BadAction(f"{key}={value!r} is not an integer") from None


def _float(params: dict[str, str], key: str, default: float) -> float:
    try:
        return float(params.get(key, default))
    except ValueError:
        raise _BadAction(f"{key}={params[key]!r} is not a number") from None


def _tokens(values: list[str]) -> list[str]:
    return [t.strip().lower() for v in values for t in v.split(",") if t.strip()]


class Upstream:
    """The recording upstream. `Upstream().start()`, point the proxy at `.url`, then inspect
    `.records` / `wait_record(req_id)`; `stop()` closes everything."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 ssl: ssl_module.SSLContext | None = None, unix: str | None = None) -> None:
        """`ssl`: serve HTTPS with this server context; `unix`: listen on this socket path
        (`url` is then `unix:PATH`, the proxy's upstream form)."""
        self.host = host
        self.port = port
        self.ssl = ssl
        self.unix = unix
        self.url = ""
        self._cond = threading.Condition()
        self._records: list[Record] = []
        self._gates: dict[str, Gate] = {}
        self._conns: set[_Conn] = set()
        self._open = 0
        self._total = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None

    # lifecycle (test thread)
    def start(self) -> Upstream:
        """Start the loop thread and bind; returns self so `Upstream().start()` chains."""
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="upstream", daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._bind(), loop).result(10)
        if self.unix is not None:
            self.url = f"unix:{self.unix}"
            return self
        self.port = self._server.sockets[0].getsockname()[1]
        scheme = "https" if self.ssl is not None else "http"
        self.url = f"{scheme}://{self.host}:{self.port}"
        return self

    async def _bind(self) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        if self.unix is not None:
            return await loop.create_unix_server(lambda: _Conn(self), self.unix, backlog=1024)
        return await loop.create_server(
            lambda: _Conn(self), self.host, self.port, backlog=1024, reuse_address=True,
            ssl=self.ssl)

    def stop(self) -> None:
        """Close the listener and every connection, then the loop and its thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()
            self._loop = self._thread = None

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        conns = list(self._conns)
        tasks = [c.task for c in conns if c.task is not None and not c.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for conn in conns:
            if conn.transport is not None:
                conn.transport.abort()
        await asyncio.sleep(0)
        if self._server is not None:
            await asyncio.wait_for(self._server.wait_closed(), 5)

    def __enter__(self) -> Upstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # inspection (test thread)
    @property
    def records(self) -> list[Record]:
        """A snapshot of every request seen, in arrival order."""
        with self._cond:
            return list(self._records)

    def find(self, req_id: str) -> Record | None:
        """The first record carrying `x-req-id: req_id`, or None."""
        with self._cond:
            return next((r for r in self._records if r.req_id == req_id), None)

    def find_all(self, req_id: str) -> list[Record]:
        """Every record carrying `x-req-id: req_id` (a proxy retry shows up as two)."""
        with self._cond:
            return [r for r in self._records if r.req_id == req_id]

    def wait_record(self, req_id: str, timeout: float = 10.0,
                    complete: bool | None = None) -> Record:
        """Block until the request with this id has arrived; with `complete` given (either
        value), also until its body ended or its connection died, so `complete` and `aborted`
        are final. The caller asserts on them; raises TimeoutError if that never happens."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                rec = next((r for r in self._records if r.req_id == req_id), None)
                if rec is not None and (complete is None or rec.final):
                    return rec
                left = deadline - time.monotonic()
                if left <= 0:
                    state = "never arrived" if rec is None else f"not final: {rec!r}"
                    raise TimeoutError(f"upstream request {req_id!r} {state}")
                self._cond.wait(left)

    def gate(self, name: str) -> Gate:
        """The named gate (created on first use); `.set()` releases `download gate=name`."""
        with self._cond:
            return self._gates.setdefault(name, Gate())

    def open_connections(self) -> int:
        """Client connections currently open."""
        return self._open

    def total_connections(self) -> int:
        """Connections accepted since start."""
        return self._total

    def reset(self) -> None:
        """Forget the records (connections and gates stay)."""
        with self._cond:
            self._records.clear()

    # bookkeeping (loop thread)
    def _connection_made(self, conn: _Conn) -> int:
        self._conns.add(conn)
        self._open += 1
        self._total += 1
        return self._total

    def _connection_lost(self, conn: _Conn) -> None:
        self._conns.discard(conn)
        self._open -= 1

    def _add(self, rec: Record) -> None:
        with self._cond:
            self._records.append(rec)
            self._cond.notify_all()

    def _finalize(self, rec: Record, *, complete: bool, aborted: bool = False,
                  error: str | None = None) -> None:
        with self._cond:
            if rec.t_end is None:
                rec.complete = complete
                rec.aborted = aborted
                rec.error = rec.error or error
                rec.t_end = time.monotonic()
            self._cond.notify_all()

    # serving (loop thread)
    async def _serve(self, conn: _Conn) -> None:
        """Requests on one connection, in order, until either side closes."""
        body: _BodyReader | None = None
        try:
            while True:
                try:
                    head = await conn.read_head()
                except _BadRequest:
                    self._send(conn, None, 400, [], b"request head too large\n", close=True)
                    return
                if head is None:
                    return
                req = self._parse(conn, head)
                body = req.body
                if req.rec.error is not None:
                    self._send(conn, req, 400, [], f"{req.rec.error}\n".encode(), close=True)
                    return
                try:
                    keep = await self._dispatch(conn, req)
                except _BadRequest as exc:
                    body.abandon(str(exc))
                    self._send(conn, req, 400, [], f"{exc}\n".encode(), close=True)
                    return
                if not keep:
                    return
                body = None
        except (_PeerGone, ConnectionError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("upstream handler failed on connection %d", conn.conn_id)
        finally:
            if body is not None:
                body.abandon()
            conn.close()

    def _parse(self, conn: _Conn, head: bytes) -> _Request:
        """Strictly parse a head into a Record (error set if it is not valid HTTP/1.1)."""
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        error: str | None = None
        if len(parts) != 3 or not TOKEN.fullmatch(parts[0]) or not parts[1] \
                or not VERSION.fullmatch(parts[2]):
            error = f"bad request line {lines[0][:200]!r}"
        parts += [b""] * (3 - len(parts))
        headers: list[tuple[bytes, bytes]] = []
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            value = value.strip(b" \t")
            headers.append((name, value))
            if error is None:
                if line[:1] in (b" ", b"\t"):
                    error = "obsolete line folding"
                elif not colon or not TOKEN.fullmatch(name):
                    error = f"bad header line {line[:200]!r}"
                elif any(c in value for c in (b"\r", b"\n", b"\x00")):
                    error = f"CR, LF or NUL in header {name!r}"
        rec = Record(req_id=None, conn_id=conn.conn_id, method=parts[0].decode("latin-1"),
                     target=parts[1], http_version=parts[2].decode("latin-1"),
                     headers=headers, framing="none", content_length=None,
                     t_head=time.monotonic())
        rec.req_id = rec.header("x-req-id")
        if error is None:
            try:
                self._framing(rec)
            except _BadRequest as exc:
                error = str(exc)
        connection = _tokens(rec.header_all("connection"))
        keep_alive = rec.http_version == "HTTP/1.1" and "close" not in connection
        expect = rec.http_version == "HTTP/1.1" and \
            any(v.lower() == "100-continue" for v in rec.header_all("expect"))
        action, params = "echo", {}
        spec = rec.header("x-upstream")
        if spec is not None:
            try:
                words = shlex.split(spec)
            except ValueError:
                words = ["(unparsable)"]
            if words:
                action = words[0]
                params = {k: v for k, _, v in (w.partition("=") for w in words[1:])}
        req = _Request(rec, _BodyReader(self, conn, rec), action, params, keep_alive, expect)
        if error is not None:
            rec.error = error
            req.body.done = True
        self._add(rec)
        if error is not None:
            self._finalize(rec, complete=False, error=error)
        elif req.body.done:
            self._finalize(rec, complete=True)
        return req

    @staticmethod
    def _framing(rec: Record) -> None:
        """RFC 9112 6.3: chunked (last coding) wins over Content-Length; both is recorded."""
        te = _tokens(rec.header_all("transfer-encoding"))
        cl = rec.header_all("content-length")
        if cl:
            values = {v.strip().encode("latin-1") for item in cl for v in item.split(",")}
            if len(values) != 1 or not DIGITS.fullmatch(next(iter(values))):
                raise _BadRequest(f"bad Content-Length {cl!r}")
            rec.content_length = int(next(iter(values)))
            rec.framing = "content-length"
        if te:
            if te[-1] != "chunked" or te.count("chunked") != 1:
                raise _BadRequest(f"unsupported Transfer-Encoding {te!r}")
            rec.framing = "both" if cl else "chunked"

    # responses
    def _send(self, conn: _Conn, req: _Request | None, status: int,
              headers: list[tuple[str, str]], body: bytes = b"", *, close: bool = False
              ) -> None:
        """Write a whole response; the body is left out for HEAD, 204 and 304."""
        out = list(headers)
        no_body = status in (204, 304) or (req is not None and req.head_only)
        if status not in (204, 304):
            out.append(("Content-Length", str(len(body))))
        if close:
            out.append(("Connection", "close"))
        conn.write(self._head(req, status, out) + (b"" if no_body else body))

    @staticmethod
    def _head(req: _Request | None, status: int, headers: list[tuple[str, str]]) -> bytes:
        """A response head; x-req-id is echoed unless the headers already carry one."""
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Unknown"
        lines = [f"HTTP/1.1 {status} {reason}"]
        lines += [f"{k}: {v}" for k, v in headers]
        if req is not None and req.rec.req_id is not None \
                and not any(k.lower() == "x-req-id" for k, _ in headers):
            lines.append(f"x-req-id: {req.rec.req_id}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _read_body(self, conn: _Conn, req: _Request) -> None:
        """Send 100 Continue if asked, then consume the whole body."""
        if req.expect_continue and not req.body.done:
            conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await req.body.read_all()

    def _echo_json(self, req: _Request) -> bytes:
        rec = req.rec
        return json.dumps({
            "method": rec.method,
            "target": rec.target.decode("latin-1"),
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in rec.headers],
            "framing": rec.framing,
            "body_length": rec.body_length,
            "body_sha256": rec.body_sha256,
            "conn_id": rec.conn_id,
        }).encode()

    async def _send_body(self, conn: _Conn, src: _Source, *, chunked: bool, chunk: int,
                         gate: Gate | None = None, limit: int | None = None,
                         interval: float | None = None, final: bool = True) -> None:
        """Stream src: `chunk`-byte chunks when chunked, else large writes; the first chunk
        goes before waiting on `gate`, `interval` sleeps between chunks, `limit` stops early
        (and `final=False` leaves out the last chunk)."""
        end = src.size if limit is None else min(limit, src.size)
        offset = 0
        while offset < end:
            if chunked or gate is not None or interval is not None:
                step = min(chunk, end - offset)
            else:
                step = end - offset
            if chunked:
                conn.write(b"%x\r\n" % step)
            sent = 0
            while sent < step:
                piece = min(WRITE_PIECE, step - sent)
                conn.write(src.slice(offset + sent, piece))
                sent += piece
                await conn.drain()
            if chunked:
                conn.write(b"\r\n")
            offset += step
            if gate is not None:
                await gate.wait_async(30.0, conn.gone)
                gate = None
            if interval is not None and offset < end:
                await asyncio.sleep(interval)
            await conn.drain()
        if chunked and final:
            conn.write(b"0\r\n\r\n")

    async def _dispatch(self, conn: _Conn, req: _Request) -> bool:
        """Answer one request per its x-upstream action; returns whether to keep the
        connection for another request."""
        action = getattr(self, f"_do_{req.action}", None)
        if action is None:
            await self._read_body(conn, req)
            self._send(conn, req, 400, [("Content-Type", "text/plain")],
                       f"unknown x-upstream action {req.action!r}\n".encode(),
                       close=not req.keep_alive)
            return req.keep_alive
        try:
            keep: bool = await action(conn, req)
        except _BadAction as exc:
            await self._read_body(conn, req)
            self._send(conn, req, 400, [("Content-Type", "text/plain")],
                       f"{exc}\n".encode(), close=not req.keep_alive)
            return req.keep_alive
        return keep

    async def _do_echo(self, conn: _Conn, req: _Request, close: bool = False) -> bool:
        await self._read_body(conn, req)
        keep = req.keep_alive and not close
        self._send(conn, req, 200, [("Content-Type", "application/json")],
                   self._echo_json(req), close=not keep)
        return keep

    async def _do_close(self, conn: _Conn, req: _Request) -> bool:
        return await self._do_echo(conn, req, close=True)

    async def _do_sleep(self, conn: _Conn, req: _Request) -> bool:
        seconds = _float(req.params, "seconds", 1.0)
        await self._read_body(conn, req)
        await asyncio.sleep(seconds)
        return await self._do_echo(conn, req)

    async def _do_slowread(self, conn: _Conn, req: _Request) -> bool:
        rate = max(1, _int(req.params, "rate"))
        piece = max(1, rate // 20)
        conn.read_high = piece
        if req.expect_continue and not req.body.done:
            conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        start, got = time.monotonic(), 0
        while data := await req.body.read(piece):
            got += len(data)
            ahead = got / rate - (time.monotonic() - start)
            if ahead > 0:
                await asyncio.sleep(ahead)
        conn.read_high = READ_HIGH
        return await self._do_echo(conn, req)

    async def _do_download(self, conn: _Conn, req: _Request) -> bool:
        p = req.params
        size = _int(p, "size")
        chunked = p.get("chunked") == "1"
        chunk = max(1, _int(p, "chunk", 65536))
        gate = self.gate(p["gate"]) if "gate" in p else None
        data = text_bytes(size) if p.get("text") == "1" else None
        if p.get("gzip") == "1":
            data = gzip.compress(data, mtime=0) if data is not None else gzip_pattern(size)
        src = _Source(size, data)
        await self._read_body(conn, req)
        headers = [("Content-Type", p.get("ctype", "application/octet-stream"))]
        if p.get("gzip") == "1":
            headers.append(("Content-Encoding", "gzip"))
        if "cc" in p:
            headers.append(("Cache-Control", p["cc"]))
        headers.append(("Transfer-Encoding", "chunked") if chunked
                       else ("Content-Length", str(src.size)))
        if not req.keep_alive:
            headers.append(("Connection", "close"))
        conn.write(self._head(req, 200, headers))
        if not req.head_only:
            await self._send_body(conn, src, chunked=chunked, chunk=chunk, gate=gate)
        return req.keep_alive

    async def _do_sse(self, conn: _Conn, req: _Request) -> bool:
        count = _int(req.params, "count", 3)
        interval = _float(req.params, "interval", 0.1)
        gate = req.params.get("gate")
        await self._read_body(conn, req)
        conn.write(self._head(req, 200, [("Content-Type", "text/event-stream"),
                                         ("Cache-Control", "no-cache"),
                                         ("Transfer-Encoding", "chunked")]))
        if req.head_only:
            return req.keep_alive
        for i in range(count):
            if i and gate is not None:
                await self.gate(f"{gate}-{i - 1}").wait_async(30.0, conn.gone)
            elif i:
                await asyncio.sleep(interval)
            event = f"data: event-{i}\n\n".encode()
            conn.write(b"%x\r\n%s\r\n" % (len(event), event))
            await conn.drain()
        conn.write(b"0\r\n\r\n")
        return req.keep_alive

    async def _do_status(self, conn: _Conn, req: _Request) -> bool:
        p = req.params
        code = _int(p, "code")
        if not 200 <= code <= 999:
            raise _BadAction(f"code={code} is not a final status")
        early = p.get("early") == "1"
        if not early:
            await self._read_body(conn, req)
        headers = [] if code in (204, 304) else [("Content-Type", "text/plain")]
        if "location" in p:
            headers.append(("Location", p["location"]))
        keep = req.keep_alive and not early
        self._send(conn, req, code, headers, p.get("body", f"status {code}").encode("latin-1"),
                   close=not keep)
        return keep

    async def _do_headers(self, conn: _Conn, req: _Request) -> bool:
        try:
            pairs = json.loads(req.rec.header("x-upstream-headers") or "[]")
            headers = [(str(k), str(v)) for k, v in pairs]
        except (ValueError, TypeError) as exc:
            raise _BadAction(f"bad x-upstream-headers: {exc}") from None
        code = _int(req.params, "status", 200)
        await self._read_body(conn, req)
        te = _tokens([v for k, v in headers if k.lower() == "transfer-encoding"])
        cl = [v for k, v in headers if k.lower() == "content-length"]
        no_body = req.head_only or code in (204, 304) or 100 <= code < 200
        close = not req.keep_alive or "close" in _tokens(
            [v for k, v in headers if k.lower() == "connection"])
        if not te and not cl:
            headers.append(("Content-Length", "0" if code in (204, 304) else "2"))
        conn.write(self._head(req, code, headers))
        if no_body:
            return not close
        if te and te[-1] == "chunked":
            conn.write(b"2\r\nok\r\n0\r\n\r\n")
        elif te:
            conn.write(b"ok")  # a non-chunked coding: the body runs to the close
            return False
        elif cl:
            n = int(cl[0]) if cl[0].strip().isdigit() else 2
            conn.write(b"o" * n)
        else:
            conn.write(b"ok")
        return not close

    async def _do_pieces(self, conn: _Conn, req: _Request) -> bool:
        p = req.params
        try:
            pieces = [base64.b64decode(item, validate=True)
                      for item in json.loads(req.rec.header("x-upstream-pieces") or "[]")]
        except (ValueError, TypeError) as exc:
            raise _BadAction(f"bad x-upstream-pieces: {exc}") from None
        chunked = p.get("chunked") == "1"
        interval = _float(p, "interval", 0.2)
        await self._read_body(conn, req)
        headers = [("Content-Type", p.get("ctype", "text/html; charset=utf-8"))]
        if "encoding" in p:
            headers.append(("Content-Encoding", p["encoding"]))
        headers.append(("Transfer-Encoding", "chunked") if chunked
                       else ("Content-Length", str(sum(map(len, pieces)))))
        conn.write(self._head(req, 200, headers))
        if req.head_only:
            return req.keep_alive
        for i, piece in enumerate(filter(None, pieces)):
            if i:
                await asyncio.sleep(interval)
            conn.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            await conn.drain()
        if chunked:
            conn.write(b"0\r\n\r\n")
        return req.keep_alive

    async def _do_raw(self, conn: _Conn, req: _Request) -> bool:
        try:
            data = base64.b64decode(req.rec.header("x-upstream-raw") or "", validate=True)
        except ValueError as exc:
            raise _BadAction(f"bad x-upstream-raw: {exc}") from None
        await self._read_body(conn, req)
        conn.write(data)
        return req.params.get("close") != "1"

    async def _do_hang(self, conn: _Conn, req: _Request) -> bool:
        seconds = _float(req.params, "seconds", 120.0)
        await self._read_body(conn, req)
        try:
            await asyncio.wait_for(conn.gone.wait(), seconds)
        except asyncio.TimeoutError:
            pass
        return False

    async def _do_reset(self, conn: _Conn, req: _Request) -> bool:
        req.body.abandon()
        conn.reset()
        return False

    async def _do_cut(self, conn: _Conn, req: _Request) -> bool:
        p = req.params
        size, after, chunk = _int(p, "size"), _int(p, "after"), max(1, _int(p, "chunk", 65536))
        chunked = p.get("chunked") == "1"
        await self._read_body(conn, req)
        extra = [("Cache-Control", p["cc"])] if "cc" in p else []
        conn.write(self._head(req, 200, [
            ("Content-Type", p.get("ctype", "application/octet-stream")), *extra,
            ("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(size))]))
        await self._send_body(conn, _Source(size), chunked=chunked,
                              chunk=chunk, limit=after, final=False)
        return False

    async def _do_trickle(self, conn: _Conn, req: _Request) -> bool:
        p = req.params
        size = _int(p, "size")
        interval = _float(p, "interval", 0.1)
        chunk = max(1, _int(p, "chunk", 1))
        await self._read_body(conn, req)
        conn.write(self._head(req, 200, [("Content-Type", "application/octet-stream"),
                                         ("Transfer-Encoding", "chunked")]))
        await self._send_body(conn, _Source(size), chunked=True, chunk=chunk,
                              interval=interval)
        return req.keep_alive

