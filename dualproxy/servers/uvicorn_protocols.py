"""uvicorn's protocols with the stop handed to dualproxy's drain clock (drain.py).

uvicorn starts a graceful stop by calling `shutdown()` on every connection:
that is where the clock starts, in every uvicorn-run process (one server,
`--workers N`, gunicorn's uvicorn worker). Its WebSocket protocol would close
an open socket right there with 1012; dualproxy's contract keeps it open until
the graceful timeout and then closes it 1001 (the ASGI face's session does),
like any other exchange still in flight. Loaded by import string from
`uvicorn_stop_settings`, only on the uvicorn releases the suite tests.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

from uvicorn.protocols.http.auto import AutoHTTPProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from ..drain import DRAIN


def start_clock() -> None:
    """Start the drain clock; the next SIGINT (uvicorn's force quit) ends what is left
    first, so it is logged, not cancelled. uvicorn puts its own handler back after."""
    if DRAIN.deadline is None and threading.current_thread() is threading.main_thread():
        forced: Any = signal.getsignal(signal.SIGINT)
        if callable(forced):
            def force(signum: int, frame: FrameType | None) -> None:
                DRAIN.end_now()
                forced(signum, frame)

            signal.signal(signal.SIGINT, force)
    DRAIN.begin()


# How long an idle keep-alive connection stays open once the stop began.
IDLE_GRACE = 1.0


class HTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc,valid-type]
    """uvicorn's HTTP protocol (httptools), with the stop starting the drain clock.

    uvicorn closes an idle keep-alive connection the moment a stop begins; a
    client sending its next request right then gets a reset (seen across a
    `--workers` HUP restart). As gunicorn 27 does, the connection stays open
    IDLE_GRACE seconds instead: a request that comes is answered with
    `Connection: close`, a connection that stays quiet is closed.
    """

    draining = False

    def shutdown(self) -> None:
        start_clock()
        idle = self.cycle is None or self.cycle.response_complete
        if not idle or not hasattr(self, "on_headers_complete"):  # busy, or h11's protocol
            super().shutdown()
            return
        self.draining = True
        self._unset_keepalive_if_required()
        self.timeout_keep_alive_task = self.loop.call_later(
            IDLE_GRACE, self.timeout_keep_alive_handler)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        if self.draining and self.cycle is not None:
            self.cycle.keep_alive = False


class WebSocketProtocol(WebSocketsSansIOProtocol):
    def shutdown(self) -> None:
        start_clock()
        if DRAIN.armed and self.handshake_complete and not self.close_sent:
            return  # open: the app closes it with 1001 at the deadline
        super().shutdown()
