"""Request ids: one `X-Request-ID` per exchange, end to end.

The id is the trusted peer's own `X-Request-ID` when the peer is a trusted
proxy (`trusted_proxies`) and the value is acceptable: one line, 1 to 200
visible ASCII characters (no space, no control, no comma). Otherwise (no such line, an
untrusted peer, a bad value) a new one is made: 32 hex digits from 16 random
bytes, as nginx's `$request_id`. The id is

- sent upstream as `X-Request-ID` (the client's own line replaced);
- returned to the client as `X-Request-ID` (the upstream's line replaced),
  on the upstream's answers and on the answers of filters inside this one;
- in the access log (`request_id=` in text, `"request_id"` in json);
- `exchange.request_id` for the filters after this one (it is the outermost
  built-in filter) and `{request_id}` in header rules.

Off by default (`--request-id`, `request_id = true`, `request_id=True`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

from ..core import ResponseHead
from .base import Exchange, Filter

HEADER = b"x-request-id"
MAX_LENGTH = 200
# Visible ASCII but the comma: two lines joined (as gunicorn's WSGI environ joins
# them) would otherwise read as one id.
_ACCEPTABLE = re.compile(rb"[\x21-\x2b\x2d-\x7e]{1,%d}\Z" % MAX_LENGTH)


def new_request_id() -> str:
    """32 random hex digits (16 bytes from the OS: no lock, about a microsecond)."""
    return os.urandom(16).hex()


def acceptable(value: bytes) -> bool:
    """Is `value` an id we may keep: 1 to MAX_LENGTH visible ASCII characters, no comma?"""
    return _ACCEPTABLE.match(value) is not None


class RequestId(Filter):
    """Keep a trusted peer's `X-Request-ID`, or make one; send it both ways."""

    name = "request_id"

    def __init__(self, is_trusted: Callable[[str | None], bool] | None = None) -> None:
        # Whether a peer is a trusted proxy (ProxyConfig.is_trusted); None: no peer
        # is (no trusted_proxies), every id is made here.
        self.is_trusted = is_trusted

    def on_request(self, exchange: Exchange) -> None:
        plan = exchange.plan
        assert plan is not None
        request_id = None
        incoming = exchange.incoming
        if self.is_trusted is not None and self.is_trusted(incoming.peer):
            theirs = [v for n, v in incoming.headers if n == HEADER]
            if len(theirs) == 1 and acceptable(theirs[0]):
                request_id = theirs[0].decode("ascii")
        if request_id is None:
            request_id = new_request_id()
        exchange.request_id = request_id
        exchange.record.request_id = request_id
        headers = [(n, v) for n, v in plan.headers if n.lower() != HEADER]
        headers.append((HEADER, request_id.encode("ascii")))
        plan.headers[:] = headers

    def on_response(self, exchange: Exchange, head: ResponseHead) -> None:
        request_id = exchange.request_id
        if request_id is None:
            return
        headers = [(n, v) for n, v in head.headers if n.lower() != HEADER]
        headers.append((HEADER, request_id.encode("ascii")))
        head.headers[:] = headers

