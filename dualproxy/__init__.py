"""dualproxy: a streaming reverse proxy with a sync WSGI face and an async ASGI face.

`AsyncProxy` is an ASGI app, `SyncProxy` a WSGI app; both take the same
arguments (or one shared `ProxyConfig`) and behave byte for byte the same,
because every decision is made by the shared core.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import ProxyConfig
from .core import IncomingRequest, ResponseHead, UpstreamPlan
from .errors import (
    BadGateway,
    BadRequest,
    BodyTooLarge,
    GatewayTimeout,
    ProxyError,
    ServiceUnavailable,
)

if TYPE_CHECKING:
    from .asgi import AsyncProxy
    from .router import AsyncRouter, SyncRouter
    from .wsgi import SyncProxy

__version__ = "0.1.0"

__all__ = [
    "AsyncProxy",
    "AsyncRouter",
    "BadGateway",
    "BadRequest",
    "BodyTooLarge",
    "GatewayTimeout",
    "IncomingRequest",
    "ProxyConfig",
    "ProxyError",
    "ResponseHead",
    "ServiceUnavailable",
    "SyncProxy",
    "SyncRouter",
    "UpstreamPlan",
    "__version__",
]


def __getattr__(name: str) -> Any:
    # The faces are imported lazily so `import dualproxy` stays light.
    if name == "AsyncProxy":
        from .asgi import AsyncProxy

        return AsyncProxy
    if name == "SyncProxy":
        from .wsgi import SyncProxy

        return SyncProxy
    if name in ("AsyncRouter", "SyncRouter"):
        from . import router

        return getattr(router, name)
    raise AttributeError(name)
