"""Where an upstream connection goes, and how its failure to open reads: for both drivers.

A connection's key is (scheme, host, port), or ("unix", socket path, 0): idle
connections are pooled per key, so two hosts or two sockets never share one.
"""

from __future__ import annotations

import httpx

from ..errors import UpstreamTLSError
from ..upstreams import Upstream
from .tls import verification_failure

Key = tuple[str, str, int]


def upstream_key(upstream: Upstream) -> Key:
    if upstream.socket_path is not None:
        return "unix", upstream.socket_path, 0
    return upstream.scheme, upstream.host, upstream.port


def address(key: Key) -> str:
    scheme, host, port = key
    return f"unix:{host}" if scheme == "unix" else f"{host}:{port}"


def connect_failed(key: Key, exc: OSError) -> httpx.ConnectError:
    """The httpx error for a failed connect or TLS handshake (a refused certificate
    is UpstreamTLSError: the faces say so in their 502)."""
    reason = verification_failure(exc)
    if reason is not None:
        return UpstreamTLSError(f"{address(key)}: {reason}", reason=reason)
    return httpx.ConnectError(f"{address(key)}: {exc}")
