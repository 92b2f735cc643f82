"""The request head as the servers bound it, before the core ever sees it.

The core refuses a head past its documented limits (config.py: an 8000-byte
target, 100 header fields, 32768 bytes of them), but only once the server
has read and parsed it all: gunicorn's parser is quadratic in the head's
size and uvicorn's grows a buffer with it. So each server stops reading at
HEAD_LIMIT, a little above anything the core could accept, and answers 414
(request line) or 431 itself as problem+json; and a client gets
`header_timeout()` seconds to send its head (nginx's client_header_timeout),
so trickled partial heads (slowloris) hold no thread and no connection for
long.
"""

from __future__ import annotations

from ..errors import HeadersTooLarge, ProxyError, TargetTooLong

# gunicorn's largest limit_request_line; the core's 8000-byte target fits in it.
REQUEST_LINE_LIMIT = 8190
# The core's 32768 bytes of header fields, the request line and CRLFs, with room
# for optional whitespace around values (which the core does not count).
HEAD_LIMIT = 48 * 1024
# gunicorn's limit_request_fields and limit_request_field_size: the core's.
FIELDS_LIMIT = 100
FIELD_SIZE_LIMIT = 32768

DEFAULT_HEADER_TIMEOUT = 30.0
# How long a refused connection keeps draining what the client still sends
# after the answer (nginx's lingering close): closing with unread bytes resets
# the connection, and the client may never read the answer.
LINGER = 2.0

_header_timeout = DEFAULT_HEADER_TIMEOUT


def set_header_timeout(seconds: float) -> None:
    """`--header-timeout`, set in each worker process before it serves."""
    global _header_timeout
    _header_timeout = seconds


def header_timeout() -> float:
    return _header_timeout


def head_too_large(size: int, line_done: bool) -> ProxyError | None:
    """The refusal for a head of `size` bytes so far, or None while it may still
    be accepted: 414 when the request line alone (not `line_done`) is too long.
    (RFC 9112 2.2: one empty line may come before it.)"""
    if not line_done and size > REQUEST_LINE_LIMIT + 4:
        return TargetTooLong(f"request line longer than {REQUEST_LINE_LIMIT} bytes")
    if size > HEAD_LIMIT:
        return HeadersTooLarge(f"request head larger than {HEAD_LIMIT} bytes")
    return None


class HeadTimeout(ProxyError):
    status = 408
    close_connection = True

    def __init__(self) -> None:
        super().__init__(f"the request head did not arrive within {header_timeout():g} seconds")


def raw_problem(exc: ProxyError) -> bytes:
    """A whole HTTP/1.1 answer for `exc`, written by a server itself (it closes)."""
    head = [f"HTTP/1.1 {exc.status} {exc.title}\r\n".encode()]
    head += [name + b": " + value + b"\r\n" for name, value in exc.headers()]
    if not exc.close_connection:
        head.append(b"connection: close\r\n")
    return b"".join(head) + b"\r\n" + exc.body()
