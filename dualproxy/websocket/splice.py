"""Raw bytes both ways between two sockets, for the WSGI face's WebSocket tunnel.

One thread, one poll() over both sockets, one read in flight per direction:
while a read is unsent its source is not read again, so a slow reader stalls
the writer through TCP flow control and memory stays at two reads. Frames are
followed, never decoded (`framing`), so the tunnel can refuse an oversized
message (1009) or an invalid control frame (1002), end an idle socket (1001)
and one still open at the graceful timeout (1001, when `stop_fd` becomes
readable) with a close frame to each side.
"""

from __future__ import annotations

import errno
import select
import socket
import ssl
import time
from typing import NamedTuple

from ..errors import describe
from .framing import GOING_AWAY, FrameScanner, close_frame

READ_SIZE = 65536
LINGER = 5.0        # after one side's FIN, how long the other direction may go on
GOODBYE = 1.0       # how long a side gets to answer the tunnel's close frame
_WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
_FAILED = select.POLLERR | select.POLLNVAL
# Linux reports a peer's FIN without a read; it ends a tunnel whose reader stopped.
_POLLRDHUP = getattr(select, "POLLRDHUP", 0)


class SpliceResult(NamedTuple):
    """Bytes relayed each way, the socket error that ended both at once if one did,
    and whether `stop_fd` ended it."""

    to_upstream: int
    to_client: int
    failure: str | None = None
    stopped: bool = False


class _Direction:
    """Bytes read from `src`, waiting to be written to `dst` (one read at most)."""

    __slots__ = ("src", "dst", "pending", "eof", "fin", "shut", "moved", "scanner",
                 "refused", "to_server")

    def __init__(self, src: socket.socket, dst: socket.socket, early: bytes,
                 max_size: int | None, *, to_server: bool) -> None:
        self.src, self.dst, self.to_server = src, dst, to_server
        self.scanner = FrameScanner(max_size, masked=to_server)
        self.pending = memoryview(b"")
        self.eof = self.shut = self.refused = False
        self.fin = False  # the source's FIN arrived (maybe still behind unread bytes)
        self.moved = 0
        self._take(early)

    def _take(self, data: bytes) -> None:
        cut = self.scanner.scan(data)
        if cut is not None:
            data, self.refused = data[:cut], True
        self.pending = memoryview(data)

    def wants_read(self) -> bool:
        return not (self.eof or self.refused or self.pending)

    def read_events(self) -> int:
        """What to poll the source for: data, or (while not reading) just its FIN."""
        if self.wants_read():
            return select.POLLIN
        return 0 if self.eof or self.fin else _POLLRDHUP

    def readable_now(self) -> bool:
        """TLS may hold decrypted bytes that poll() cannot see."""
        src = self.src
        return self.wants_read() and isinstance(src, ssl.SSLSocket) and src.pending() > 0

    def read(self) -> bool:
        try:
            data = self.src.recv(READ_SIZE)
        except _WOULD_BLOCK:
            return False
        if data:
            self._take(data)
        else:
            self.eof = True
        return True

    def write(self) -> bool:
        """Send what is pending; once the source ended and all is sent, pass the FIN on."""
        moved = False
        if self.pending:
            try:
                n = self.dst.send(self.pending)
            except _WOULD_BLOCK:
                return False
            self.pending = self.pending[n:]
            self.moved += n
            moved = n > 0
        if self.eof and not self.pending and not self.shut:
            self.shut = True
            _half_close(self.dst)
        return moved

    def say_goodbye(self, code: int, reason: str) -> None:
        """Flush, then close frame to `dst` if it can go between two frames, then FIN."""
        if self.shut:
            return
        self.shut = True
        dst = self.dst
        dst.settimeout(GOODBYE)
        try:
            dst.sendall(self.pending)
            self.moved += len(self.pending)
            scanner = self.scanner
            if scanner.at_boundary and scanner.clean_cut:
                dst.sendall(close_frame(code, reason, masked=self.to_server))
        except OSError:
            pass
        _half_close(dst)


def _half_close(sock: socket.socket) -> None:
    """Pass a FIN on. Not on TLS: Python's SSLSocket.shutdown() drops the TLS layer,
    so later reads would return raw records; a TLS side ends the tunnel instead."""
    if isinstance(sock, ssl.SSLSocket):
        return
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _drain(socks: list[socket.socket], seconds: float) -> None:
    """Read and drop until each socket ended (their close answers), for `seconds` at most."""
    deadline = time.monotonic() + seconds
    for sock in socks:
        try:
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                if not sock.recv(READ_SIZE):
                    break
        except OSError:
            pass


def relay(client: socket.socket, upstream: socket.socket, *, to_client: bytes = b"",
          to_upstream: bytes = b"", idle: float | None = None,
          max_size: int | None = None, stop_fd: int | None = None) -> SpliceResult:
    """Move bytes both ways until both sides closed; (client->upstream, upstream->client).

    `to_client`/`to_upstream`: bytes read before the tunnel opened, sent first.
    A FIN is passed on (half-close; a TLS side is closed instead) and the other
    direction gets LINGER seconds more; a reset or error on either side ends
    both at once (`failure`). A message over `max_size` ends both with close
    1009, a control frame over 125 bytes or fragmented with 1002, `idle` seconds
    of silence with 1001, and so does `stop_fd` becoming readable (the drain
    deadline). Both sockets are left for the caller to close.
    """
    up = _Direction(client, upstream, to_upstream, max_size, to_server=True)
    down = _Direction(upstream, client, to_client, max_size, to_server=False)
    client.setblocking(False)
    upstream.setblocking(False)
    cfd, ufd = client.fileno(), upstream.fileno()
    tls = isinstance(client, ssl.SSLSocket) or isinstance(upstream, ssl.SSLSocket)
    poller = select.poll()
    masks = {cfd: 0, ufd: 0}
    if stop_fd is not None:
        poller.register(stop_fd, select.POLLIN)
    quiet_since = time.monotonic()
    linger_until: float | None = None
    try:
        while True:
            moved = up.write() | down.write()
            # Linger from the first EOF, flushed or not: a peer that stopped reading
            # must not keep the other side's end waiting on TCP's retransmissions.
            if up.fin or down.fin or up.eof or down.eof:
                if up.shut and down.shut or tls and (
                        up.shut and isinstance(upstream, ssl.SSLSocket)
                        or down.shut and isinstance(client, ssl.SSLSocket)):
                    break
                if linger_until is None:
                    linger_until = time.monotonic() + LINGER
                elif time.monotonic() >= linger_until:
                    break
            for refused in (up, down):
                if refused.refused and not refused.pending:
                    return _goodbye(up, down, *refused.scanner.refusal)
            wait: float | None = None
            if idle is not None:
                now = time.monotonic()
                if moved:
                    quiet_since = now
                elif now - quiet_since >= idle:
                    return _goodbye(up, down, GOING_AWAY, "idle timeout")
                wait = quiet_since + idle - now
            if linger_until is not None:
                left = linger_until - time.monotonic()
                wait = left if wait is None else min(wait, left)
            for fd, mask in ((cfd, up.read_events() | (select.POLLOUT if down.pending else 0)),
                             (ufd, down.read_events() | (select.POLLOUT if up.pending else 0))):
                if mask != masks[fd]:
                    if mask:
                        poller.register(fd, mask)
                    else:
                        poller.unregister(fd)
                    masks[fd] = mask
            if tls and (up.readable_now() or down.readable_now()):
                wait = 0
            ready = poller.poll(None if wait is None else max(int(wait * 1000), 0))
            client_ready = upstream_ready = False
            for fd, events in ready:
                if fd == stop_fd:
                    return _goodbye(up, down, GOING_AWAY, "server shutting down", stopped=True)
                if events & _FAILED:
                    raise ConnectionResetError(errno.ECONNRESET, "a tunnelled socket failed")
                if fd == cfd:
                    client_ready = True
                    up.fin = up.fin or bool(events & _POLLRDHUP)
                else:
                    upstream_ready = True
                    down.fin = down.fin or bool(events & _POLLRDHUP)
            read = False
            if up.wants_read() and (client_ready or tls and up.readable_now()):
                read = up.read()
            if down.wants_read() and (upstream_ready or tls and down.readable_now()):
                read = down.read() or read
            if read and idle is not None:
                quiet_since = time.monotonic()
    except OSError as exc:
        return SpliceResult(up.moved, down.moved, describe(exc))
    return SpliceResult(up.moved, down.moved)


def _goodbye(up: _Direction, down: _Direction, code: int, reason: str,
             stopped: bool = False) -> SpliceResult:
    up.say_goodbye(code, reason)
    down.say_goodbye(code, reason)
    _drain([up.src, down.src], GOODBYE)
    return SpliceResult(up.moved, down.moved, stopped=stopped)
