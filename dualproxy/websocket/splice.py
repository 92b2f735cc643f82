"""Raw bytes both ways between two sockets, for the WSGI face's WebSocket tunnel.

One thread, one poll() over both sockets, one read in flight per direction:
while a read is unsent its source is not read again, so a slow reader stalls
the writer through TCP flow control and memory stays at two reads. Frames are
followed, never decoded (`framing`), so the tunnel can refuse an oversized
message (1009) and end an idle socket (1001) with a close frame to each side.
"""

from __future__ import annotations

import errno
import select
import socket
import ssl
import time

from .framing import GOING_AWAY, MESSAGE_TOO_BIG, FrameScanner, close_frame

READ_SIZE = 65536
LINGER = 5.0        # after one side's FIN, how long the other direction may go on
GOODBYE = 1.0       # how long a side gets to answer the tunnel's close frame
_WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
_FAILED = select.POLLERR | select.POLLNVAL


class _Direction:
    """Bytes read from `src`, waiting to be written to `dst` (one read at most)."""

    __slots__ = ("src", "dst", "pending", "eof", "shut", "moved", "scanner", "refused",
                 "to_server")

    def __init__(self, src: socket.socket, dst: socket.socket, early: bytes,
                 max_size: int | None, *, to_server: bool) -> None:
        self.src, self.dst, self.to_server = src, dst, to_server
        self.scanner = FrameScanner(max_size)
        self.pending = memoryview(b"")
        self.eof = self.shut = self.refused = False
        self.moved = 0
        self._take(early)

    def _take(self, data: bytes) -> None:
        cut = self.scanner.scan(data)
        if cut is not None:
            data, self.refused = data[:cut], True
        self.pending = memoryview(data)

    def wants_read(self) -> bool:
        return not (self.eof or self.refused or self.pending)

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

    @property
    def finished(self) -> bool:
        return self.shut

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
          max_size: int | None = None) -> tuple[int, int]:
    """Move bytes both ways until both sides closed; (client->upstream, upstream->client).

    `to_client`/`to_upstream`: bytes read before the tunnel opened, sent first.
    A FIN is passed on (half-close; a TLS side is closed instead) and the other
    direction gets LINGER seconds more; a reset or error on either side ends
    both at once (OSError). A message over `max_size` ends both with close
    1009, `idle` seconds of silence with 1001. Both sockets are left for the
    caller to close.
    """
    up = _Direction(client, upstream, to_upstream, max_size, to_server=True)
    down = _Direction(upstream, client, to_client, max_size, to_server=False)
    directions = (up, down)
    for sock in (client, upstream):
        sock.setblocking(False)
    poller = select.poll()
    fds = {client.fileno(): client, upstream.fileno(): upstream}
    quiet_since = time.monotonic()
    linger_until: float | None = None
    while True:
        moved = False
        for d in directions:
            moved = d.write() or moved
        if up.finished and down.finished or any(
                d.finished and isinstance(d.dst, ssl.SSLSocket) for d in directions):
            break
        if any(d.refused and not d.pending for d in directions):
            return _goodbye(directions, MESSAGE_TOO_BIG, "message too big")
        now = time.monotonic()
        if moved:
            quiet_since = now
        if idle is not None and now - quiet_since >= idle:
            return _goodbye(directions, GOING_AWAY, "idle timeout")
        if linger_until is None and (up.finished or down.finished):
            linger_until = now + LINGER
        deadlines = [t for t in (linger_until, None if idle is None else quiet_since + idle)
                     if t is not None]
        wait = min(deadlines) - now if deadlines else None
        if linger_until is not None and now >= linger_until:
            break
        events: dict[socket.socket, int] = {}
        for d in directions:
            if d.wants_read():
                events[d.src] = events.get(d.src, 0) | select.POLLIN
            if d.pending:
                events[d.dst] = events.get(d.dst, 0) | select.POLLOUT
        if any(d.readable_now() for d in directions):
            wait = 0
        for fd, sock in fds.items():
            if sock in events:
                poller.register(fd, events[sock])
            else:
                try:
                    poller.unregister(fd)
                except KeyError:
                    pass
        ready = poller.poll(None if wait is None else max(int(wait * 1000), 1))
        if any(ev & _FAILED for _, ev in ready):
            raise ConnectionResetError(errno.ECONNRESET, "a tunnelled socket failed")
        ready_socks = {fds[fd] for fd, _ in ready}
        for d in directions:
            if d.wants_read() and (d.src in ready_socks or d.readable_now()) and d.read():
                quiet_since = time.monotonic()
    return up.moved, down.moved


def _goodbye(directions: tuple[_Direction, _Direction], code: int,
             reason: str) -> tuple[int, int]:
    for d in directions:
        d.say_goodbye(code, reason)
    _drain([d.src for d in directions], GOODBYE)
    up, down = directions
    return up.moved, down.moved
