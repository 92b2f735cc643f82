"""A tiny raw-socket HTTP/1.1 client for tests that must see the wire.

httpx normalises targets and hides framing; these helpers send exact bytes and
report exactly how the response was framed and whether it ended cleanly (a
proxy that aborts a broken stream must leave `complete=False`).
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    framing: str            # "content-length" | "chunked" | "close" | "none"
    complete: bool          # body ended as its framing promised
    interim: list[int] = field(default_factory=list)  # 1xx statuses seen first

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def header_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def names(self) -> list[str]:
        return [k.lower() for k, _ in self.headers]


class Reader:
    """Buffered reads from a socket; `eof` once the peer closed."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.eof = False

    def _fill(self) -> bool:
        if self.eof:
            return False
        try:
            data = self.sock.recv(1 << 20)
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def line(self) -> bytes | None:
        while b"\r\n" not in self.buf:
            if not self._fill():
                return None
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def exactly(self, n: int) -> tuple[bytes, bool]:
        while len(self.buf) < n:
            if not self._fill():
                data, self.buf = self.buf, b""
                return data, False
        data, self.buf = self.buf[:n], self.buf[n:]
        return data, True

    def rest(self) -> bytes:
        while self._fill():
            pass
        data, self.buf = self.buf, b""
        return data


def read_head(reader: Reader) -> tuple[int, str, list[tuple[str, str]], list[int]]:
    interim: list[int] = []
    while True:
        line = reader.line()
        if line is None:
            raise ConnectionError("connection closed before a response head")
        version, _, rest = line.decode("latin-1").partition(" ")
        code, _, reason = rest.partition(" ")
        headers: list[tuple[str, str]] = []
        while True:
            hline = reader.line()
            if hline is None:
                raise ConnectionError("connection closed inside the response head")
            if not hline:
                break
            name, _, value = hline.decode("latin-1").partition(":")
            headers.append((name, value.strip()))
        status = int(code)
        if 100 <= status < 200 and status != 101:
            interim.append(status)
            continue
        return status, reason, headers, interim


def read_response(reader: Reader, method: str = "GET") -> RawResponse:
    status, reason, headers, interim = read_head(reader)
    lower = {k.lower(): v for k, v in headers}
    if method == "HEAD" or status in (204, 304):
        return RawResponse(status, reason, headers, b"", "none", True, interim)
    if "chunked" in lower.get("transfer-encoding", "").lower():
        body = bytearray()
        while True:
            size_line = reader.line()
            if size_line is None:
                return RawResponse(status, reason, headers, bytes(body), "chunked", False, interim)
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers
                    trailer = reader.line()
                    if trailer is None:
                        return RawResponse(status, reason, headers, bytes(body), "chunked",
                                           False, interim)
                    if not trailer:
                        return RawResponse(status, reason, headers, bytes(body), "chunked",
                                           True, interim)
            data, ok = reader.exactly(size + 2)
            body += data[:size]
            if not ok:
                return RawResponse(status, reason, headers, bytes(body), "chunked", False, interim)
    if "content-length" in lower:
        data, ok = reader.exactly(int(lower["content-length"]))
        return RawResponse(status, reason, headers, data, "content-length", ok, interim)
    return RawResponse(status, reason, headers, reader.rest(), "close", True, interim)


def connect(port: int, timeout: float = 30.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def exchange(port: int, raw: bytes, *, method: str | None = None,
             timeout: float = 30.0) -> RawResponse:
    """Send `raw` on a fresh connection and read one response."""
    if method is None:
        method = raw.split(b" ", 1)[0].decode()
    with connect(port, timeout) as sock:
        sock.sendall(raw)
        return read_response(Reader(sock), method)


def request_bytes(method: str, target: str | bytes, headers: list[tuple[str, str]] | None = None,
                  body: bytes | None = None, host: str = "proxy.test") -> bytes:
    """A well-formed request; Content-Length is added for a body unless given."""
    if isinstance(target, str):
        target = target.encode("latin-1")
    lines = [method.encode() + b" " + target + b" HTTP/1.1", b"Host: " + host.encode()]
    given = {k.lower() for k, _ in headers or []}
    for key, value in headers or []:
        lines.append(f"{key}: {value}".encode("latin-1"))
    if body is not None and "content-length" not in given and "transfer-encoding" not in given:
        lines.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


def wait_until(predicate: object, timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Poll `predicate()` until true or the timeout passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(interval)
    return bool(predicate())  # type: ignore[operator]
