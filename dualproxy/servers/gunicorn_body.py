"""gunicorn's request body read straight off the socket (a private-internals speed-up).

Offered to the WSGI face through the body-input registry (body_input.py) when
this module is imported (servers/gunicorn.py does, for `dualproxy serve`; an app
run under a gunicorn of its own may import it too), and used only on the
gunicorn releases the suite tests (`servers.TESTED`); anywhere else the face
reads `wsgi.input`.
"""

from __future__ import annotations

import io
import socket
import sys
from typing import Any

from .. import body_input
from . import is_tested

# Largest read from the client socket when gunicorn's input is read directly.
# Such a read returns whatever has arrived (it never waits for a full piece),
# so a big bound costs a slow upload nothing and saves a fast one iterations.
DIRECT_READ = 262144


class GunicornLengthInput:
    """gunicorn's `wsgi.input` for a Content-Length body, read straight off the socket.

    gunicorn's own `read(n)` blocks until n bytes, and its unreader re-copies
    the read-ahead it keeps (up to 1 MiB, in a BytesIO) on every call: a fast
    upload spends most of its CPU copying. This reads what gunicorn already
    buffered first, then recv()s the socket itself, and keeps gunicorn's
    bookkeeping exact: the reader's remaining length drops by every byte taken
    (so gunicorn sees the body consumed and the next request on a keep-alive
    connection starts where it should), bytes past the body stay in gunicorn's
    buffer, and a failed read marks the body failed (the connection closes).
    """

    __slots__ = ("body", "reader", "unreader", "sock")
    # Its reads return what has arrived: a big one costs a slow upload nothing.
    direct_read = DIRECT_READ

    def __init__(self, body: Any, reader: Any, unreader: Any, sock: socket.socket) -> None:
        self.body = body
        self.reader = reader
        self.unreader = unreader
        self.sock = sock

    @classmethod
    def recognise(cls, stream: Any) -> GunicornLengthInput | None:
        """The direct reader when `stream` is exactly gunicorn's known shape, else None."""
        body_mod = sys.modules.get("gunicorn.http.body")
        unreader_mod = sys.modules.get("gunicorn.http.unreader")
        if body_mod is None or unreader_mod is None or not is_tested("gunicorn"):
            return None
        if type(stream) is not getattr(body_mod, "Body", None):
            return None
        reader = getattr(stream, "reader", None)
        if type(reader) is not getattr(body_mod, "LengthReader", None):
            return None
        unreader = getattr(reader, "unreader", None)
        if type(unreader) is not getattr(unreader_mod, "SocketUnreader", None):
            return None
        sock = getattr(unreader, "sock", None)
        if not (isinstance(sock, socket.socket) and isinstance(getattr(reader, "length", None), int)
                and isinstance(getattr(stream, "buf", None), io.BytesIO)
                and isinstance(getattr(unreader, "buf", None), io.BytesIO)
                and isinstance(getattr(stream, "failed", None), bool)):
            return None
        return cls(stream, reader, unreader, sock)

    def read(self, size: int) -> bytes:
        """Up to `size` bytes of the body, as soon as any are there; b"" at its end."""
        # Bytes gunicorn's Body already took from its reader (a read that asked
        # for more than the caller wanted) come first; they are counted already.
        data = _take_buffered(self.body, size)
        if data:
            return data
        reader = self.reader
        size = min(size, reader.length)
        if size <= 0:
            return b""
        # Then read-ahead from the head: the body's share of it (pipelined bytes
        # past the body stay where gunicorn expects them), then the socket.
        data = _take_buffered(self.unreader, size)
        if not data:
            try:
                data = self.sock.recv(size)
            except BaseException:
                self.body.failed = True
                raise
            if not data:
                self.body.failed = True  # the client left mid-body: never reuse
                return b""
        reader.length -= len(data)
        return data


def _take_buffered(owner: Any, size: int) -> bytes:
    """Up to `size` bytes from the front of `owner.buf`, a gunicorn BytesIO that is
    appended at its end; the rest stays there, as gunicorn's own reads leave it."""
    buf = owner.buf
    buf.seek(0, io.SEEK_END)
    if not buf.tell():
        return b""
    data: bytes = buf.getvalue()
    owner.buf = rest = io.BytesIO()
    rest.write(data[size:])
    return data[:size]


def client_left(exc: BaseException) -> bool:
    """Did reading the body fail because the client closed its connection (not because
    the body was malformed)? gunicorn's chunked reader raises NoMoreData at the end of
    input; its errors for a malformed chunk are OSErrors too, so the class decides."""
    if isinstance(exc, ConnectionError):
        return True
    if "gunicorn" not in sys.modules:  # not under gunicorn: not its reader's error
        return False
    try:
        from gunicorn.http.errors import NoMoreData
    except ImportError:  # no gunicorn: not its reader
        return False
    return isinstance(exc, NoMoreData)


class GunicornSource:
    """This module's offer to the WSGI face (body_input.BodySource)."""

    recognise = staticmethod(GunicornLengthInput.recognise)
    client_left = staticmethod(client_left)


body_input.register(GunicornSource())
