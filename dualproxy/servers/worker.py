"""The uvicorn worker class dualproxy runs under gunicorn.

uvicorn trusts X-Forwarded-For from 127.0.0.1 by default (`proxy_headers`),
and so does the stock uvicorn worker: behind dualproxy that would let any
local client choose the peer address the proxy reports upstream. The core
decides about forwarding headers itself, so the server must not. WebSocket:
the same implementation and message limit as `dualproxy serve` on uvicorn.
"""

from __future__ import annotations

import json
import os
import signal
from types import FrameType
from typing import Any

from uvicorn_worker import UvicornWorker as _StockWorker

from ..config import DEFAULT_WS_MAX_SIZE
from ..drain import DRAIN
from . import ENV_OPTIONS
from .uvicorn import uvicorn_protocol_settings, uvicorn_ws_settings


class UvicornWorker(_StockWorker):  # type: ignore[misc]
    sockets: list[Any]  # gunicorn's listeners (set by its Worker.__init__)
    CONFIG_KWARGS: dict[str, Any] = {
        "loop": "auto",
        "http": "auto",
        "proxy_headers": False,
        "lifespan": "on",
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        options = json.loads(os.environ.get(ENV_OPTIONS, "{}"))
        max_size = options.get("ws_max_size", DEFAULT_WS_MAX_SIZE)
        self.CONFIG_KWARGS = {**type(self).CONFIG_KWARGS, **uvicorn_ws_settings(max_size)}
        if "graceful_timeout" in options:  # dualproxy's protocols, inside gunicorn
            self.CONFIG_KWARGS.update(uvicorn_protocol_settings(options["graceful_timeout"]))
        super().__init__(*args, **kwargs)

    def init_signals(self) -> None:
        """The stock worker's signals, but SIGTERM and SIGINT end the worker with a
        SystemExit instead of the default action: uvicorn re-raises the signal it
        captured once drained, and dying by it skipped the process's atexit handlers
        (the tracer provider's flush); this way the worker exits 0 through them, as a
        drained `dualproxy serve` on uvicorn does."""
        super().init_signals()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, _exit)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """gunicorn's quick stop sends SIGQUIT, which this worker routes here and the
        stock one only notes: end what is left now (logged), so uvicorn's stop,
        waiting for connections, finishes instead of being killed 2 s later."""
        if sig == signal.SIGQUIT:
            DRAIN.end_now()
        super().handle_exit(sig, frame)

    def run(self) -> None:
        # uvloop closes a listening socket's fd itself, then calls close() on the object
        # it was given: gunicorn's wrapper would close that fd again and log "Error while
        # closing socket [Errno 9] Bad file descriptor" at every stop. The plain socket
        # inside it knows it is closed.
        self.sockets = [getattr(sock, "sock", sock) for sock in self.sockets]
        super().run()


def _exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)
