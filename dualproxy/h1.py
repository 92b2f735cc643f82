"""A minimal, strict HTTP/1.1 client codec: bytes in, heads and body pieces out.

Sans-IO (h11's idea, a fraction of its cost): the sync and async transports
both feed it bytes. It is strict where leniency would let a response smuggle
or poison a pooled connection: conflicting lengths, bad chunk sizes and
malformed header lines are protocol errors, and a head with both framing
headers is marked never-reuse.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import httpx

MAX_HEAD = 65536
MAX_PIECE = 262144  # the most body bytes one feed() returns: big bodies flow in pieces
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) (\d{3})(?: ([^\r\n]*))?\Z")
_TOKEN_CHARS = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
# One header line: `token ":" OWS value OWS CR`, anchored after the previous
# LF; findall over the block takes every line at once (no Python loop per
# byte). A line it cannot take (obs-fold, a bare CR or LF, no colon, a bad
# name) leaves the match count short of the line count: a protocol error.
_FIELD = re.compile(rb"\n(" + _TOKEN_CHARS + rb"):[ \t]*((?:[^\r\n]*[^ \t\r\n])?)[ \t]*\r(?=\n)")
# Control bytes other than HTAB (CR and LF are policed by _FIELD).
_BAD_BYTE = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}\Z")

LENGTH, CHUNKED, CLOSE, NONE = "length", "chunked", "close", "none"


def protocol_error(message: str) -> httpx.RemoteProtocolError:
    return httpx.RemoteProtocolError(message)


@dataclass
class Head:
    """A parsed response head and the framing of the body that follows it."""

    status: int
    reason: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]
    framing: str
    length: int
    reusable: bool


def build_request_head(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """The request line and header block, exactly as given (nothing added)."""
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def request_framing(headers: list[tuple[bytes, bytes]]) -> tuple[str, int, bool]:
    """How the request body is framed, from the headers the core wrote, and
    whether the request allows keeping the connection (no `Connection: close`)."""
    framing, length, keep = NONE, 0, True
    for name, value in headers:
        lname = name.lower()
        if lname == b"transfer-encoding" and value.lower().endswith(b"chunked"):
            framing = CHUNKED
        elif lname == b"content-length" and framing == NONE:
            framing, length = LENGTH, int(value)
        elif lname == b"connection" and b"close" in value.lower():
            keep = False
    return framing, length, keep


def parse_head(buf: bytearray, method: bytes) -> Head | None:
    """Take one complete response head off `buf`, or None while it is incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_HEAD:
            raise protocol_error("response head too large")
        return None
    block = bytes(buf[:end + 2])  # status line and header lines, each ending in CRLF
    del buf[:end + 4]
    if _BAD_BYTE.search(block):
        raise protocol_error("control character in response head")
    eol = block.find(b"\r\n")
    match = _STATUS_LINE.match(block, 0, eol)
    if match is None:
        raise protocol_error("malformed status line")
    headers: list[tuple[bytes, bytes]] = _FIELD.findall(block, eol + 1)
    if len(headers) != block.count(b"\n") - 1:
        raise protocol_error("malformed header line")
    minor, code, reason = match.groups()
    status = int(code)
    lengths: set[bytes] = set()
    codings: list[bytes] = []
    connection = b""
    for name, value in headers:
        size = len(name)
        if size == 14 or size == 17 or size == 10:  # the only names that matter here
            lname = name.lower()
            if lname == b"content-length":
                lengths.update(v.strip() for v in value.split(b","))
            elif lname == b"transfer-encoding":
                codings += [c.strip().lower() for c in value.split(b",")]
            elif lname == b"connection":
                connection += b"," + value.lower()
    tokens = {t.strip() for t in connection.split(b",")} if connection else set()
    version = b"HTTP/1." + minor
    reusable = (b"close" not in tokens) if minor == b"1" else (b"keep-alive" in tokens)
    if status < 200 or status in (204, 304) or method == b"HEAD":
        framing, length = NONE, 0
        if status == 101:
            reusable = False  # the connection now speaks another protocol
    elif codings:
        if codings[-1] != b"chunked":
            framing, length, reusable = CLOSE, 0, False
        else:
            framing, length = CHUNKED, 0
        if lengths:
            reusable = False  # both framing headers: the core answers 502, never reuse
    elif lengths:
        if len(lengths) != 1:
            raise protocol_error("conflicting Content-Length values")
        (raw,) = lengths
        if not raw.isdigit() or len(raw) > 18:
            raise protocol_error("invalid Content-Length")
        framing, length = LENGTH, int(raw)
    else:
        framing, length, reusable = CLOSE, 0, False
    return Head(status, reason or b"", version, headers, framing, length, reusable)


def _pop_front(buf: bytearray, n: int) -> bytes:
    """The first `n` bytes of `buf`, removed from it (all of it without a slice copy)."""
    if n == len(buf):
        data = bytes(buf)
        buf.clear()
    else:
        data = bytes(buf[:n])
        del buf[:n]
    return data


class BodyDecoder:
    """Turns buffered bytes into body data for one response, consuming `buf`.

    `feed(buf)` returns the body bytes available now (at most about MAX_PIECE,
    so call it again before waiting for more); `done` says the body ended as
    framed. Chunked encoding is decoded (sizes strictly hex), never any
    content coding.
    """

    __slots__ = ("framing", "remaining", "done", "_state")

    def __init__(self, head: Head) -> None:
        self.framing = head.framing
        self.remaining = head.length
        self.done = head.framing == NONE or (head.framing == LENGTH and head.length == 0)
        self._state = "size"

    def feed(self, buf: bytearray, eof: bool) -> bytes:
        if self.done:
            return b""
        if self.framing == LENGTH:
            n = min(self.remaining, len(buf), MAX_PIECE)
            data = _pop_front(buf, n)
            self.remaining -= n
            if self.remaining == 0:
                self.done = True
            elif eof and not buf:
                raise protocol_error("upstream closed before the end of the body")
            return data
        if self.framing == CLOSE:
            data = _pop_front(buf, min(len(buf), MAX_PIECE))
            if eof and not buf:
                self.done = True
            return data
        out = self._chunked(buf)
        if not self.done and eof and not out:
            raise protocol_error("upstream closed inside a chunked body")
        return out

    @property
    def whole_reads(self) -> bool:
        """True while this body can take whole reads with `take` (no chunk framing)."""
        return not self.done and self.framing in (LENGTH, CLOSE)

    def take(self, piece: bytes) -> tuple[bytes, bytes]:
        """One read of a Content-Length or close-delimited body, uncopied when it fits.

        Returns the body's part of `piece` (`piece` itself when all of it is
        body) and what follows the body (stray bytes: the caller must never
        reuse the connection then). The end of a close-delimited body is EOF,
        which `feed` reports.
        """
        if self.framing == CLOSE:
            return piece, b""
        n = self.remaining
        if len(piece) < n:
            self.remaining = n - len(piece)
            return piece, b""
        self.remaining = 0
        self.done = True
        if len(piece) == n:
            return piece, b""
        return piece[:n], piece[n:]

    def _chunked(self, buf: bytearray) -> bytes:
        pieces: list[bytes] = []
        budget = MAX_PIECE
        while True:
            if self._state == "data":
                n = min(self.remaining, len(buf), budget)
                if n:
                    pieces.append(_pop_front(buf, n))
                    self.remaining -= n
                    budget -= n
                if self.remaining:
                    break
                self._state = "crlf"
            if self._state == "crlf":
                if len(buf) < 2:
                    break
                if buf[:2] != b"\r\n":
                    raise protocol_error("missing CRLF after chunk data")
                del buf[:2]
                self._state = "size"
            if self._state == "size":
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > 4096:
                        raise protocol_error("chunk size line too long")
                    break
                size_field = bytes(buf[:end]).split(b";", 1)[0].strip(b" \t")
                del buf[:end + 2]
                if not _HEX.match(size_field):
                    raise protocol_error("invalid chunk size")
                self.remaining = int(size_field, 16)
                self._state = "data" if self.remaining else "trailers"
                continue
            if self._state == "trailers":
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD:
                        raise protocol_error("trailers too large")
                    break
                del buf[:end + 2]
                if end == 0:
                    self.done = True
                    break
        return b"".join(pieces)
