"""The uvicorn worker class dualproxy runs under gunicorn.

uvicorn trusts X-Forwarded-For from 127.0.0.1 by default (`proxy_headers`),
and so does the stock uvicorn worker: behind dualproxy that would let any
local client choose the peer address the proxy reports upstream. The core
decides about forwarding headers itself, so the server must not.
"""

from __future__ import annotations

from typing import Any

from uvicorn_worker import UvicornWorker as _StockWorker


class UvicornWorker(_StockWorker):  # type: ignore[misc]
    CONFIG_KWARGS: dict[str, Any] = {
        "loop": "auto",
        "http": "auto",
        "proxy_headers": False,
        "lifespan": "on",
    }
