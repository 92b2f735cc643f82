"""The chunked body decoder (RFC 9112 7.1) and the byte rules the head parser shares.

As strict as the stricter of h11 and llhttp wherever they differ on something a
smuggler could use: sizes are hex (leading zeros aside) with nothing but an
extension after them, lines end in CRLF, trailers are field lines and never
framing fields.
"""

from __future__ import annotations

import re

from .errors import RemoteProtocolError

MAX_HEAD = 65536    # the most bytes of a head, or of a trailer section
MAX_PIECE = 262144  # the most buffered body bytes handed out at once
TOKEN_CHARS = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
BAD_BYTE = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # control bytes but HTAB, CR, LF
# A bare LF or CR: refused at once rather than waited on (no CRLF would come).
BARE_EOL = re.compile(rb"(?<!\r)\n|\r(?=[^\n])")
# chunk-size [";" extensions]: leading zeros do not count, no whitespace before
# the ";" (RFC 9112 7.1.1 allows BWS there, but h11 and llhttp both refuse it).
_CHUNK_SIZE = re.compile(rb"0*([0-9A-Fa-f]{1,16})(?:;[^\r\n]*)?\Z")
_MAX_SIZE_LINE = 4096
# One trailer line (the CRLF taken off): a header field line, nothing else.
_TRAILER = re.compile(TOKEN_CHARS + rb":[^\x00-\x08\x0a-\x1f\x7f]*\Z")
# Framing fields are never trailers (RFC 9110 6.5.1): llhttp refuses a
# Content-Length there, h11 any Transfer-Encoding but a plain `chunked`;
# llhttp may close after a Connection or Transfer-Encoding trailer.
_FRAMING_TRAILER = re.compile(rb"(?i)(content-length|transfer-encoding|connection):(.*)")


def _trailer_keeps_alive(line: bytes) -> bool:
    """Check one trailer line; False when it is a Connection or Transfer-Encoding
    field, which makes llhttp close: never reuse after one."""
    if not _TRAILER.match(line):
        raise RemoteProtocolError("malformed trailer line")
    field = _FRAMING_TRAILER.match(line)
    if field is None:
        return True
    name = field.group(1).lower()
    if name == b"content-length" or (name == b"transfer-encoding"
                                     and field.group(2).strip(b" \t").lower() != b"chunked"):
        raise RemoteProtocolError("a framing field among the trailers")
    return False


class ChunkedDecoder:
    """Decodes one chunked body off a receive buffer, piece by piece."""

    __slots__ = ("_left", "_part", "_trailers", "done", "keep_alive")

    def __init__(self) -> None:
        self._left = 0
        self._part = "size"
        self._trailers = 0       # bytes of the trailer section so far (MAX_HEAD at most)
        self.done = False        # the last chunk and the trailers are in
        self.keep_alive = True   # False after a trailer that makes llhttp close

    def decode(self, buf: bytearray) -> bytes:
        """The body bytes `buf` holds now (at most MAX_PIECE), taken off it."""
        pieces: list[bytes] = []
        budget = MAX_PIECE
        while not self.done:
            if self._part == "data":
                n = min(self._left, len(buf), budget)
                if n:
                    pieces.append(bytes(buf[:n]))
                    del buf[:n]
                    self._left -= n
                    budget -= n
                if self._left:
                    break
                self._part = "crlf"
            if self._part == "crlf":
                if len(buf) < 2:
                    break
                if buf[:2] != b"\r\n":
                    raise RemoteProtocolError("missing CRLF after chunk data")
                del buf[:2]
                self._part = "size"
            line = self._line(buf, _MAX_SIZE_LINE if self._part == "size"
                              else MAX_HEAD - self._trailers)
            if line is None:
                break
            if self._part == "size":
                match = _CHUNK_SIZE.match(line)
                if match is None or BAD_BYTE.search(line):
                    raise RemoteProtocolError("invalid chunk size line")
                self._left = int(match.group(1), 16)
                self._part = "data" if self._left else "trailers"
            elif not line:
                self.done = True
            elif (trailers := self._trailers + len(line) + 2) > MAX_HEAD:
                raise RemoteProtocolError("trailer section too large")
            else:
                self._trailers = trailers
                if not _trailer_keeps_alive(line):
                    self.keep_alive = False
        return b"".join(pieces)

    @staticmethod
    def _line(buf: bytearray, limit: int) -> bytes | None:
        """One CRLF-ended line taken off `buf` (without the CRLF), None while incomplete.
        Longer than `limit` is refused whether it came whole or in pieces."""
        end = buf.find(b"\r\n")
        if end < 0:
            # (a last CR may start the CRLF: it does not count)
            if len(buf) - buf.endswith(b"\r") > limit or BARE_EOL.search(buf):
                raise RemoteProtocolError("line too long or not ended by CRLF")
            return None
        if end > limit:
            raise RemoteProtocolError("line too long")
        line = bytes(buf[:end])
        del buf[:end + 2]
        return line
