"""WebSocket proxying for both faces.

- `handshake` (pure): the core's rules for an upgrade, used by both faces.
- `relay_async`: the ASGI face (and the a2wsgi bridge) opens the upstream with
  the `websockets` asyncio client and relays messages, extensions per hop.
- `tunnel`, `splice`, `framing` (pure): the WSGI face takes over the client
  socket after the upstream's 101 and relays raw bytes, as nginx does.

Nothing here is imported until a WebSocket arrives; this module holds only
the uvicorn settings `dualproxy serve` starts its servers with.
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
