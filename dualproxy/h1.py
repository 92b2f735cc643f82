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
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) (\d{3})(?: ([^\r\n]*))?\Z")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
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


def request_framing(headers: list[tuple[bytes, bytes]]) -> tuple[str, int]:
    """How the request body is framed, from the headers the core wrote."""
    for name, value in headers:
        lname = name.lower()
        if lname == b"transfer-encoding" and value.lower().endswith(b"chunked"):
            return CHUNKED, 0
        if lname == b"content-length":
            return LENGTH, int(value)
    return NONE, 0


def parse_head(buf: bytearray, method: bytes) -> Head | None:
    """Take one complete response head off `buf`, or None while it is incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_HEAD:
            raise protocol_error("response head too large")
        return None
    block = bytes(buf[:end])
    del buf[:end + 4]
    lines = block.split(b"\r\n")
    # One scan of the whole head: after splitting on CRLF, any CR, LF or other
    # control byte left is a bare line ending or an injection attempt.
    if _BAD_VALUE.search(block.replace(b"\r\n", b"")):
        raise protocol_error("control character in response head")
    match = _STATUS_LINE.match(lines[0])
    if match is None:
        raise protocol_error("malformed status line")
    minor, code, reason = match.groups()
    status = int(code)
    headers: list[tuple[bytes, bytes]] = []
    lengths: set[bytes] = set()
    codings: list[bytes] = []
    connection = b""
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.match(name):
            raise protocol_error("malformed header line")
        value = value.strip(b" \t")
        headers.append((name, value))
        lname = name.lower()
        if lname == b"content-length":
            lengths.update(v.strip() for v in value.split(b","))
        elif lname == b"transfer-encoding":
            codings += [c.strip().lower() for c in value.split(b",")]
        elif lname == b"connection":
            connection += b"," + value.lower()
    tokens = {t.strip() for t in connection.split(b",")}
    version = b"HTTP/1." + minor
    reusable = (b"close" not in tokens) if minor == b"1" else (b"keep-alive" in tokens)
    if status < 200 or status in (204, 304) or method == b"HEAD":
        framing, length = NONE, 0
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


class BodyDecoder:
    """Turns buffered bytes into body data for one response, consuming `buf`.

    `feed(buf)` returns the body bytes available now; `done` says the body
    ended as framed. Chunked encoding is decoded (sizes strictly hex), never
    any content coding.
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
            n = min(self.remaining, len(buf))
            data = bytes(buf[:n])
            del buf[:n]
            self.remaining -= n
            if self.remaining == 0:
                self.done = True
            elif eof:
                raise protocol_error("upstream closed before the end of the body")
            return data
        if self.framing == CLOSE:
            data = bytes(buf)
            buf.clear()
            if eof:
                self.done = True
            return data
        out = self._chunked(buf)
        if not self.done and eof:
            raise protocol_error("upstream closed inside a chunked body")
        return out

    def _chunked(self, buf: bytearray) -> bytes:
        pieces: list[bytes] = []
        while True:
            if self._state == "data":
                n = min(self.remaining, len(buf))
                if n:
                    pieces.append(bytes(buf[:n]))
                    del buf[:n]
                    self.remaining -= n
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
