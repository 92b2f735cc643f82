"""The codec's own errors: httpx's, so the faces' one error map turns them into 502/400."""

from __future__ import annotations

import httpx


class RemoteProtocolError(httpx.RemoteProtocolError):
    """The upstream sent something that is not HTTP/1.1 as this codec accepts it."""


class LocalProtocolError(httpx.LocalProtocolError):
    """The request cannot be sent as given (its body does not match its framing)."""
