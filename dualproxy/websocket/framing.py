"""Where WebSocket frames begin and end in a relayed byte stream (pure: no I/O).

The WSGI tunnel relays raw bytes and never decodes a payload (no codec: the
two ends keep theirs). It only follows the frame headers as they pass (RFC
6455 5.2), which is enough to know when a message outgrows the size limit
(then close 1009), when a control frame breaks RFC 6455 5.5 (more than 125
bytes or fragmented: close 1002, as either end would; it is never relayed, so
a 200 KiB ping cannot slip past the size limit), when a frame is no frame
(a reserved opcode, or a client frame not masked or a server frame masked, RFC
6455 5.1/5.2: close 1002, so a client's raw `GET /admin HTTP/1.1` never reaches
the upstream as is), and where a close frame can
be put in without cutting a frame in two (1001 on an idle socket). Sizes are
wire sizes: with permessage-deflate negotiated end to end, the compressed ones.
"""

from __future__ import annotations

import os
import struct

_CONTROL = 0x8   # opcodes from 8 up are control frames (close, ping, pong)
_MAX_CONTROL = 125  # RFC 6455 5.5: a control frame's payload, at most
_OPCODES = frozenset({0x0, 0x1, 0x2, 0x8, 0x9, 0xA})  # RFC 6455 5.2; the rest are reserved
GOING_AWAY = 1001
PROTOCOL_ERROR = 1002
MESSAGE_TOO_BIG = 1009


def _header_size(header: bytes) -> int | None:
    """The length of the frame header that starts `header`, or None before 2 bytes."""
    if len(header) < 2:
        return None
    short = header[1] & 0x7F
    size = 2 + (2 if short == 126 else 8 if short == 127 else 0)
    return size + 4 if header[1] & 0x80 else size


class FrameScanner:
    """Follows the frames of one direction of a tunnel, read by read.

    `scan(data)` returns None, or the offset in `data` of the first frame that
    makes a data message longer than `limit` or is a control frame RFC 6455 5.5
    forbids; bytes from there on must not be relayed, and `refusal` says the
    close code and reason. `at_boundary` is true between frames; `clean_cut`
    says whether the refused frame started in this read (its header was not
    relayed yet). With no `limit` (None: a plain byte relay) nothing is refused;
    the tunnel always has one (`ws_max_size` is never None). `masked`: whether
    every frame must be masked (from a client) or none (from a server).
    """

    __slots__ = ("limit", "masked", "need", "partial", "message", "clean_cut", "refusal")

    def __init__(self, limit: int | None, masked: bool | None = None) -> None:
        self.limit = limit
        self.masked = masked
        self.need = 0          # payload bytes of the current frame still to come
        self.partial = b""     # a header split across reads
        self.message = 0       # payload bytes of the current data message so far
        self.clean_cut = True
        self.refusal = (MESSAGE_TOO_BIG, "message too big")

    @property
    def at_boundary(self) -> bool:
        return self.need == 0 and not self.partial

    def scan(self, data: bytes | memoryview) -> int | None:
        i, end = 0, len(data)
        if self.need >= end:  # all payload of the current frame: the common big-message read
            self.need -= end
            return None
        while i < end:
            if self.need:
                step = min(self.need, end - i)
                self.need -= step
                i += step
                continue
            started = i - len(self.partial)
            header = self.partial + bytes(data[i:i + 14])
            size = _header_size(header)
            if size is None or len(header) < size:
                self.partial = header
                return None
            i += size - len(self.partial)
            self.partial = b""
            short = header[1] & 0x7F
            if short == 126:
                length = int.from_bytes(header[2:4], "big")
            elif short == 127:
                length = int.from_bytes(header[2:10], "big")
            else:
                length = short
            if self.limit is not None and (
                    header[0] & 0x0F not in _OPCODES
                    or self.masked is not None and bool(header[1] & 0x80) != self.masked):
                self.clean_cut = started >= 0
                self.refusal = (PROTOCOL_ERROR, "invalid frame")
                return max(started, 0)
            if header[0] & 0x0F < _CONTROL:
                self.message += length
                if self.limit is not None and self.message > self.limit:
                    self.clean_cut = started >= 0
                    return max(started, 0)
                if header[0] & 0x80:  # FIN: the message is complete
                    self.message = 0
            elif self.limit is not None and (length > _MAX_CONTROL or not header[0] & 0x80):
                self.clean_cut = started >= 0
                self.refusal = (PROTOCOL_ERROR, "invalid control frame")
                return max(started, 0)
            self.need = length
        return None


def close_frame(code: int, reason: str, *, masked: bool) -> bytes:
    """A close frame (RFC 6455 5.5.1); masked when it goes to the upstream (a server)."""
    payload = struct.pack("!H", code) + reason.encode()[:123]
    if not masked:
        return bytes([0x88, len(payload)]) + payload
    key = os.urandom(4)
    body = bytes(b ^ key[n % 4] for n, b in enumerate(payload))
    return bytes([0x88, 0x80 | len(payload)]) + key + body
