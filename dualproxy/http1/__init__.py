"""dualproxy's HTTP/1.1 client: one sans-IO connection, a sync and an async driver.

`ClientConnection` (bytes in, events out) owns every framing, reuse and retry
decision; `framing` is the one rule for message framing, shared with the core;
`aio` and `sync` are the drivers behind httpx's transport interfaces. The
drivers load on first use, so the core can import `framing` without any I/O code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..framing import FramingError, parse_framing
from .connection import NEED_DATA, ClientConnection, Data, EndOfMessage, Response
from .errors import LocalProtocolError, RemoteProtocolError

if TYPE_CHECKING:
    from .aio import AsyncUpstreamTransport
    from .sync import CLIENT_WATCH, ClientWatch, UpstreamTransport, connect_upstream

_DRIVERS = {"AsyncUpstreamTransport": "aio", "UpstreamTransport": "sync",
            "ClientWatch": "sync", "CLIENT_WATCH": "sync", "connect_upstream": "sync"}

__all__ = [
    "CLIENT_WATCH",
    "NEED_DATA",
    "AsyncUpstreamTransport",
    "ClientConnection",
    "ClientWatch",
    "Data",
    "EndOfMessage",
    "FramingError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "Response",
    "UpstreamTransport",
    "connect_upstream",
    "parse_framing",
]


def __getattr__(name: str) -> Any:
    module = _DRIVERS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{module}", __name__), name)
