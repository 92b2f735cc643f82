"""WebSocket proxying: the pure handshake plan both faces share, and the async relay.

`handshake` is pure (the core's rules for an upgrade); `relay_async` opens the
upstream socket with the `websockets` asyncio client for the ASGI face (and
the a2wsgi bridge). Nothing here is imported until a WebSocket arrives.
"""

from __future__ import annotations

import logging
from typing import Any

# uvicorn 0.54's sans-IO implementation on `websockets` (its "auto" choice when
# websockets is installed): it offers `websocket.http.response`, so an upstream's
# refusal reaches the client as that HTTP answer, and applies backpressure both
# ways (it pauses reading per message and awaits a writable transport).
UVICORN_WS_IMPL = "websockets-sansio"


def uvicorn_ws_settings(max_size: int) -> dict[str, Any]:
    """uvicorn Config keywords for the client side of a proxied WebSocket."""
    return {"ws": UVICORN_WS_IMPL, "ws_max_size": max_size}


class _RefusalIsNoError(logging.Filter):
    """uvicorn 0.54's websockets-sansio logs "ASGI callable returned without
    completing handshake" at ERROR after an app refused a handshake with
    `websocket.http.response` (it never marks that path complete; the client got
    its answer). Every upstream refusal would log it: drop that one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.ERROR
                    and record.msg == "ASGI callable returned without completing handshake.")


def quiet_uvicorn_refusals() -> None:
    logging.getLogger("uvicorn.error").addFilter(_RefusalIsNoError())
