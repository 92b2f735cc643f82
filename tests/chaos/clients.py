"""The chaos clients: raw sockets that behave, leave, dawdle or pipeline, and note it all.

Each request gets a harness id (`x-chaos-id`) and names the upstream's behaviour
(`x-chaos-up`). What a client sent and what it received is noted in a `Sent`: the sha256 of
the body it sent whole, the sha256 of the answer's body and whether its framing ended
cleanly, how long it waited for the head, and whether it meant to leave early.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import os
import random
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tests.rawhttp import Reader as RawReader

EMPTY_SHA = hashlib.sha256().hexdigest()
KiB, MiB = 1 << 10, 1 << 20
ENDLESS_READ = 2 * MiB        # a client stops reading an answer that goes on past this
WS_KEY = base64.b64encode(b"chaos-harness-16").decode()


@dataclass
class Sent:
    """One request from a client, and what came back."""

    rid: str
    scenario: str               # client behaviour / upstream behaviour
    method: str
    target: str
    stays: bool = True          # the client meant to read the whole answer
    head_sent: bool = False
    body_sha: str | None = None  # the whole body's, once it was all sent
    t_start: float = field(default_factory=time.monotonic)
    t_sent: float | None = None  # the request was all sent
    status: int | None = None
    resp_rid: str | None = None  # x-chaos-id of the answer: it came from the upstream
    resp_len: int = 0
    resp_sha: str = EMPTY_SHA
    resp_complete: bool = False
    ctype: str = ""
    body_start: bytes = b""      # the first bytes of the answer (a proxy's own error)
    head_wait: float | None = None  # request sent -> answer head (or the end of waiting)
    body_gap: float = 0.0        # the longest wait between two reads of the answer's body
    stall_wait: float | None = None  # a stalled upload: how long until the proxy acted
    left: str | None = None      # why the client stopped early, on purpose
    error: str | None = None

    @property
    def upstream_behaviour(self) -> str:
        return self.scenario.partition("/")[2]

    @property
    def client_behaviour(self) -> str:
        return self.scenario.partition("/")[0]


class Reader(RawReader):
    """rawhttp's Reader, but an RST is told apart from a FIN."""

    reset = False
    last = 0.0        # when bytes (or the end) last arrived
    longest_gap = 0.0  # the longest wait for bytes since `last` was first set

    def _fill(self) -> bool:
        if self.eof:
            return False
        try:
            data = self.sock.recv(MiB)
        except (ConnectionResetError, BrokenPipeError):
            self.reset = True
            data = b""
        now = time.monotonic()
        if self.last:
            self.longest_gap = max(self.longest_gap, now - self.last)
        self.last = now
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True


class Leave(Exception):
    """The client leaves now, on purpose."""


@dataclass
class Plan:
    """What one client does with one request."""

    method: str = "GET"
    target: str = "/"
    up: str = "ok"
    body: bytes | None = None
    chunked: bool = False
    head_trickle: float = 0.0      # seconds between 4-byte pieces of the head
    send_pause: float = 0.0        # seconds between 4 KiB pieces of the body
    stall_upload_at: int | None = None  # stop sending here and wait for the proxy
    leave_upload_at: int | None = None
    leave_after_head: bool = False
    leave_body_at: int | None = None
    read_pause: float = 0.0
    rst: bool = False              # leave with an RST rather than a FIN
    websocket: bool = False
    filler: int = 0                # bytes of extra header fields (1000-byte lines)
    probe: bool = False            # read to the end even when the storm is over


class Clients:
    """Shared state of the client threads: the notes, the open sockets, the stop flag."""

    def __init__(self, port: int, seed: int) -> None:
        self.port = port
        self.seed = seed
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self.sent: list[Sent] = []
        self._socks: set[socket.socket] = set()
        self._n: collections.Counter[str] = collections.Counter()

    def new_id(self, name: str | None = None) -> str:
        """`SEED-THREAD-N`: the N-th request of this client thread (or `name`), the same
        in a replay."""
        name = name or threading.current_thread().name
        with self._lock:
            self._n[name] += 1
            return f"{self.seed}-{name}-{self._n[name]}"

    def note(self, sent: Sent) -> Sent:
        with self._lock:
            self.sent.append(sent)
        return sent

    def connect(self, timeout: float = 30.0) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._socks.add(sock)
        return sock

    def close(self, sock: socket.socket, rst: bool = False) -> None:
        with self._lock:
            self._socks.discard(sock)
        try:
            if rst:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        except OSError:
            pass

    def cut_all(self) -> None:
        """Wake every client still blocked on a socket (the storm is over)."""
        with self._lock:
            socks = list(self._socks)
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # -- one request

    def request(self, sock: socket.socket, reader: Reader, plan: Plan, sent: Sent) -> bool:
        """Send `plan` on `sock` and read the answer into `sent`; whether the connection
        may carry another request."""
        try:
            self._send(sock, plan, sent)
        except Leave:
            return False
        except OSError as exc:  # the proxy answered early and closed, or went away
            sent.error = f"send: {exc!r}"
        try:
            return self.read_answer(sock, reader, plan, sent)
        except Leave:
            return False
        except OSError as exc:
            sent.error = f"read: {exc!r}"
            return False

    def _send(self, sock: socket.socket, plan: Plan, sent: Sent) -> None:
        lines = [f"{plan.method} {plan.target} HTTP/1.1", "Host: chaos.test",
                 f"x-chaos-id: {sent.rid}", f"x-chaos-up: {plan.up}"]
        if plan.websocket:
            lines += ["Upgrade: websocket", "Connection: Upgrade",
                      f"Sec-WebSocket-Key: {WS_KEY}", "Sec-WebSocket-Version: 13"]
        lines += [f"x-chaos-fill-{i}: {'f' * 980}" for i in range(plan.filler // 1000)]
        if plan.body is not None:
            lines.append("Transfer-Encoding: chunked" if plan.chunked
                         else f"Content-Length: {len(plan.body)}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode()
        if plan.head_trickle:
            for i in range(0, len(head), 4):
                if self.stop.is_set():
                    sent.left = "storm over, inside the head"
                    raise Leave
                sock.sendall(head[i:i + 4])
                time.sleep(plan.head_trickle)
        else:
            sock.sendall(head)
        sent.head_sent = True
        body = plan.body
        if body is not None:
            piece = 4 * KiB if plan.send_pause else 256 * KiB
            for offset in range(0, len(body), piece):
                data = body[offset:offset + piece]
                if plan.stall_upload_at is not None and offset + len(data) > plan.stall_upload_at:
                    self._write(sock, data[:plan.stall_upload_at - offset], plan.chunked)
                    self._stall(sock, sent)
                    return
                if plan.leave_upload_at is not None and offset + len(data) > plan.leave_upload_at:
                    data = data[:plan.leave_upload_at - offset]
                    self._write(sock, data, plan.chunked)
                    sent.left = f"upload at {plan.leave_upload_at}/{len(body)}"
                    self.close(sock, plan.rst)
                    raise Leave
                self._write(sock, data, plan.chunked)
                if plan.send_pause:
                    time.sleep(plan.send_pause)
            if plan.leave_upload_at is not None:  # at the very end: all but the terminator
                sent.left = "upload, before its end"
                self.close(sock, plan.rst)
                raise Leave
            if plan.chunked:
                sock.sendall(b"0\r\n\r\n")
            sent.body_sha = hashlib.sha256(body).hexdigest()
        else:
            sent.body_sha = EMPTY_SHA
        sent.t_sent = time.monotonic()

    def _stall(self, sock: socket.socket, sent: Sent) -> None:
        """Send nothing more; wait for the proxy to answer or close (or the storm's end)."""
        sent.left = "stalled its upload"
        start = time.monotonic()
        while not self.stop.is_set():
            if select.select([sock], [], [], 0.5)[0]:
                sent.stall_wait = time.monotonic() - start
                return
        sent.stall_wait = time.monotonic() - start
        self.close(sock)
        raise Leave

    @staticmethod
    def _write(sock: socket.socket, data: bytes, chunked: bool) -> None:
        if data:
            sock.sendall(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)

    def read_answer(self, sock: socket.socket, reader: Reader, plan: Plan, sent: Sent,
                    waited_from: float | None = None) -> bool:
        """Read one answer into `sent`; whether the connection may carry another. The wait
        for its head counts from `waited_from` (default: the request's end)."""
        try:
            return self._read_answer(sock, reader, plan, sent, waited_from)
        finally:
            if self.stop.is_set() and not plan.probe and not sent.resp_complete:
                sent.left = sent.left or "storm over"  # perhaps cut by `cut_all`

    def _read_answer(self, sock: socket.socket, reader: Reader, plan: Plan, sent: Sent,
                     waited_from: float | None) -> bool:
        waited_from = waited_from or sent.t_sent or time.monotonic()
        try:
            status, headers = self._read_head(reader, sent)
        finally:  # a socket timeout too: the wait is what the head-deadline check needs
            sent.head_wait = time.monotonic() - waited_from
        if status is None:
            return False
        lower = {k.lower(): v for k, v in headers}
        sent.resp_rid = lower.get("x-chaos-id")
        sent.ctype = lower.get("content-type", "")
        if plan.leave_after_head:
            sent.left = "after the answer's head"
            self.close(sock, plan.rst)
            raise Leave
        if status == 101:
            return False
        reader.last, reader.longest_gap = time.monotonic(), 0.0
        try:
            return self._read_body(sock, reader, plan, sent, lower, status)
        finally:
            sent.body_gap = reader.longest_gap
            reader.last = 0.0

    def _read_body(self, sock: socket.socket, reader: Reader, plan: Plan, sent: Sent,
                   lower: dict[str, str], status: int) -> bool:
        digest = hashlib.sha256()
        start = bytearray()

        def take(data: bytes) -> None:
            digest.update(data)
            sent.resp_len += len(data)
            sent.resp_sha = digest.hexdigest()
            if len(start) < 2048:
                start.extend(data[:2048 - len(start)])
            sent.body_start = bytes(start)
            if plan.leave_body_at is not None and sent.resp_len >= plan.leave_body_at:
                sent.left = f"answer body at {sent.resp_len}"
                self.close(sock, plan.rst)
                raise Leave
            stopped = self.stop.is_set() and not plan.probe
            if sent.resp_len > ENDLESS_READ or stopped:
                sent.left = "storm over" if stopped else "answer too long"
                self.close(sock, plan.rst)
                raise Leave
            if plan.read_pause:
                time.sleep(plan.read_pause)

        if plan.method == "HEAD" or status in (204, 304):
            sent.resp_complete = True
        elif "chunked" in lower.get("transfer-encoding", "").lower():
            sent.resp_complete = self._read_chunked(reader, take)
        elif "content-length" in lower:
            left = int(lower["content-length"])
            while left:
                data, ok = reader.exactly(min(left, 64 * KiB))
                take(data)
                left -= len(data)
                if not ok:
                    break
            sent.resp_complete = left == 0
        else:
            while reader._fill() or reader.buf:
                data, reader.buf = bytes(reader.buf), b""
                if data:
                    take(data)
            sent.resp_complete = not reader.reset
            return False
        close = "close" in lower.get("connection", "").lower()
        return sent.resp_complete and not close

    def _read_head(self, reader: Reader, sent: Sent) -> tuple[int | None, list[tuple[str, str]]]:
        while True:
            line = reader.line()
            if line is None:
                sent.error = "closed before an answer" + (" (RST)" if reader.reset else "")
                return None, []
            try:
                status = int(line.split(b" ")[1])
            except (IndexError, ValueError):
                sent.error = f"bad status line {line[:80]!r}"
                return None, []
            headers: list[tuple[str, str]] = []
            while True:
                hline = reader.line()
                if hline is None:
                    sent.error = "closed inside an answer head"
                    return None, []
                if not hline:
                    break
                name, _, value = hline.decode("latin-1").partition(":")
                headers.append((name.strip(), value.strip()))
            if status >= 200 or status == 101:
                sent.status = status
                return status, headers

    @staticmethod
    def _read_chunked(reader: Reader, take: Callable[[bytes], None]) -> bool:
        while True:
            line = reader.line()
            if line is None:
                return False
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                return False
            if size == 0:
                while True:
                    trailer = reader.line()
                    if trailer is None:
                        return False
                    if not trailer:
                        return True
            while size:
                data, ok = reader.exactly(min(size, 64 * KiB))
                take(data)
                size -= len(data)
                if not ok:
                    return False
            if reader.exactly(2) != (b"\r\n", True):
                return False

    # -- whole scenarios

    def run_plans(self, scenario: str, plans: list[Plan], *, pipeline: bool = False) -> None:
        """One connection: the plans one after another (or all written at once)."""
        try:
            sock = self.connect()
        except OSError as exc:
            for plan in plans:
                self.note(Sent(self.new_id(), f"{scenario}/{plan.up}", plan.method,
                               plan.target, error=f"connect: {exc!r}"))
            return
        reader = Reader(sock)
        try:
            if pipeline:
                notes = [self.note(Sent(self.new_id(), f"{scenario}/{p.up}", p.method,
                                        p.target)) for p in plans]
                for plan, sent in zip(plans, notes, strict=True):
                    self._send(sock, plan, sent)
                for i, (plan, sent) in enumerate(zip(plans, notes, strict=True)):
                    try:
                        more = self.read_answer(sock, reader, plan, sent, time.monotonic())
                    except (OSError, Leave):
                        more = False
                    if not more:
                        for later in notes[i + 1:]:
                            later.error = f"unread: the connection ended with {sent.rid}"
                        break
                return
            for plan in plans:
                sent = self.note(Sent(self.new_id(), f"{scenario}/{plan.up}", plan.method,
                                      plan.target, stays=not _leaves(plan)))
                if not self.request(sock, reader, plan, sent) or self.stop.is_set():
                    break
        except (OSError, Leave):
            pass
        finally:
            self.close(sock)

    def websocket(self, scenario: str, up: str, quiet: float, how: str,
                  count: int = 1) -> None:
        """Open `count` WebSockets, send a frame on each, stay quiet, then leave `how`:
        close (a close frame, then FIN), fin or rst."""
        opened: list[socket.socket] = []
        for _ in range(count):
            if self.stop.is_set():
                break
            plan = Plan(target="/ws", up=up, websocket=True)
            sent = self.note(Sent(self.new_id(), f"{scenario}/{up}", "GET", "/ws"))
            try:
                sock = self.connect(timeout=15)
            except OSError as exc:
                sent.error = f"connect: {exc!r}"
                continue
            reader = Reader(sock)
            try:
                self._send(sock, plan, sent)
                self.read_answer(sock, reader, plan, sent)
            except (OSError, Leave) as exc:
                sent.error = sent.error or f"handshake: {exc!r}"
            if sent.status == 101:
                try:
                    sock.sendall(_frame(sent.rid.encode(), 0x1))
                except OSError:
                    pass
                opened.append(sock)
            else:
                self.close(sock)
        self.stop.wait(quiet)
        for sock in opened:
            if how == "close":
                try:
                    sock.sendall(_frame(b"\x03\xe8", 0x8))
                except OSError:
                    pass
            self.close(sock, how == "rst")

    def slowloris(self, scenario: str, count: int, seconds: float) -> None:
        """`count` connections that trickle a request head a byte at a time and never end it."""
        socks: list[tuple[socket.socket, bytes]] = []
        for _ in range(count):
            sent = self.note(Sent(self.new_id(), f"{scenario}/ok", "GET", "/slowloris",
                                  stays=False, left="inside the head (slowloris)"))
            try:
                sock = self.connect(timeout=5)
                sock.setblocking(False)
            except OSError as exc:
                sent.error = f"connect: {exc!r}"
                continue
            head = (f"GET /slowloris HTTP/1.1\r\nHost: chaos.test\r\nx-chaos-id: {sent.rid}\r\n"
                    f"x-chaos-up: ok\r\nx-filler: " + "a" * 4000).encode()
            socks.append((sock, head))
        deadline = time.monotonic() + seconds
        i = 0
        while time.monotonic() < deadline and not self.stop.is_set():
            for sock, head in socks:
                try:
                    sock.send(head[i % len(head):i % len(head) + 1])
                except OSError:
                    pass
            i += 1
            self.stop.wait(0.5)
        for sock, _ in socks:
            self.close(sock)


def _leaves(plan: Plan) -> bool:
    return plan.leave_upload_at is not None or plan.leave_after_head \
        or plan.leave_body_at is not None or plan.stall_upload_at is not None


def _frame(payload: bytes, opcode: int) -> bytes:
    """A masked client frame (payload under 126 bytes)."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


def upload(rid: str, size: int) -> bytes:
    """The body a client uploads: pseudo-random, its own per request."""
    return random.Random(rid).randbytes(size)
