"""uvicorn as `dualproxy serve` runs it: its body read-ahead tuning, its WebSocket settings."""

from __future__ import annotations

import contextlib
import importlib
import logging
import signal
import sys
from collections.abc import Iterator
from typing import Any

from ..drain import DRAIN, SLACK
from ..errors import RESPONSE_ABORTED
from . import is_tested
from .limits import HEAD_LIMIT

# How much request body uvicorn may buffer before it stops reading the client.
UVICORN_BODY_HIGH_WATER = 262144
# uvicorn 0.54's sans-IO implementation on `websockets` (its "auto" choice when
# websockets is installed): it offers `websocket.http.response`, so an upstream's
# refusal reaches the client as that HTTP answer, and applies backpressure both
# ways (it pauses reading per message and awaits a writable transport).
UVICORN_WS_IMPL = "websockets-sansio"


def uvicorn_ws_settings(max_size: int) -> dict[str, Any]:
    """uvicorn Config keywords for the client side of a proxied WebSocket."""
    return {"ws": UVICORN_WS_IMPL, "ws_max_size": max_size}


def uvicorn_protocol_settings(graceful_timeout: float) -> dict[str, Any]:
    """uvicorn Config keywords for dualproxy's protocols: a graceful stop that the
    drain clock ends, and the request head bounded (servers/limits.py).

    The protocols start the clock (servers/uvicorn_protocols.py) and keep open
    WebSockets for the app to close 1001; uvicorn's own timeout comes SLACK
    later, so it finds nothing left to cancel. Untested uvicorn: its own stop,
    and no bound on a head's size or time (httptools has none).
    """
    settings: dict[str, Any] = {"timeout_graceful_shutdown": graceful_timeout + SLACK,
                                # h11's bound on a head (its default is 16 KiB); the
                                # httptools protocol below bounds it itself.
                                "h11_max_incomplete_event_size": HEAD_LIMIT}
    if is_tested("uvicorn"):
        module = "dualproxy.servers.uvicorn_protocols"
        settings.update(http=f"{module}:HTTPProtocol", ws=f"{module}:WebSocketProtocol")
    return settings


class _RefusalIsNoError(logging.Filter):
    """uvicorn 0.54's websockets-sansio logs "ASGI callable returned without
    completing handshake" at ERROR after an app refused a handshake with
    `websocket.http.response` (it never marks that path complete; the client got
    its answer). Every upstream refusal would log it: drop that one line.
    "returned without completing response" is the proxy's own abort when the app
    said so (`RESPONSE_ABORTED`: a broken upstream, logged as one WARNING) or past
    the graceful timeout (drain.py's cut, logged `shutdown-cut`): dropped too."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.ERROR:
            return True
        return not (record.msg == "ASGI callable returned without completing handshake."
                    or record.msg == "ASGI callable returned without completing response."
                    and (DRAIN.expired or RESPONSE_ABORTED.get()))


def quiet_uvicorn_refusals() -> None:
    logging.getLogger("uvicorn.error").addFilter(_RefusalIsNoError())


def tune_uvicorn() -> None:
    """Let uvicorn read a request body in bigger steps than its 64 KiB.

    uvicorn pauses reading the client whenever more than HIGH_WATER_LIMIT
    (64 KiB) of body waits for the app's next receive(), and resumes at that
    receive: a fast upload goes pause, resume, pause, with an epoll change and
    a small message each time. Its protocols read the constant from their own
    module at every body callback, so raising it there takes effect; memory
    stays bounded per connection. Only for a uvicorn already loaded (the
    server running this process) of a tested release: the constant is private.
    """
    if "uvicorn" not in sys.modules or not is_tested("uvicorn"):
        return
    for name in ("uvicorn.protocols.http.httptools_impl", "uvicorn.protocols.http.h11_impl"):
        try:
            module = importlib.import_module(name)
        except ImportError:  # that parser's package is not installed
            continue
        limit = getattr(module, "HIGH_WATER_LIMIT", None)
        if isinstance(limit, int):
            vars(module)["HIGH_WATER_LIMIT"] = max(limit, UVICORN_BODY_HIGH_WATER)


def serve_uvicorn(app: Any, factory: str, *, host: str, port: int, workers: int,
                  log_level: str, ws_max_size: int, graceful_timeout: float,
                  certfile: str | None = None, keyfile: str | None = None) -> None:
    """Run uvicorn: `app()` in this process, or `workers` processes importing `factory`.

    `app` is a callable building the ASGI app (called only for one worker);
    `factory` is its import string, for worker processes to build their own.
    `certfile`/`keyfile`: serve HTTPS (the scope's scheme is then https).
    """
    import uvicorn
    from uvicorn.config import STARTUP_FAILURE

    common: dict[str, Any] = {
        "host": host,
        "port": port,
        "proxy_headers": False,  # see DESIGN: never let the server rewrite the peer
        "access_log": False,     # dualproxy writes its own access line
        "log_level": log_level,
        "lifespan": "on",
        **uvicorn_ws_settings(ws_max_size),
        **uvicorn_protocol_settings(graceful_timeout),
    }
    if certfile is not None:
        common.update(ssl_certfile=certfile, ssl_keyfile=keyfile)
    # uvicorn re-raises a captured SIGTERM/SIGINT once drained, under the handlers it
    # found: with handlers that only take note, a drained stop exits 0 instead of dying
    # by the signal. One that comes before uvicorn listens (while the app is built:
    # the metrics port, and so a container's health check, is up by then) is kept and
    # handed to uvicorn once it does; ignored, the proxy would not stop at all.
    early: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, _frame: early.append(signum))
    if workers > 1:  # uvicorn.run's own steps, so the supervisor gets what came early
        from uvicorn.supervisors import Multiprocess

        config = uvicorn.Config(factory, factory=True, workers=workers, **common)
        supervisor = Multiprocess(config, sockets=[config.bind_socket()])
        supervisor.signal_queue.extend(early)  # its handlers queue signals: ours join
        early.clear()
        supervisor.run()
        return

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            with super().capture_signals():
                while early:
                    signal.raise_signal(early.pop(0))  # now uvicorn's handle_exit
                yield

    config = uvicorn.Config(app(), **common)
    server = Server(config)
    server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)  # what uvicorn.run does when startup failed
