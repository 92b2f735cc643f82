"""granian as `dualproxy serve` runs it: both faces on its ASGI interface.

The WSGI face runs through dualproxy's own bridge (bridge.py, a2wsgi), as on
uvicorn, not on granian's WSGI interface: that one decodes PATH_INFO and offers
no RAW_URI (a byte-exact target is impossible), passes a cut chunked upload off
as complete, reports no client disconnect, blanks non-ASCII header values and
forwards HTTP_* environment variables. Its ASGI interface has `raw_path`, tells
of a disconnect and streams both ways with backpressure.

granian always runs its app in worker processes it starts (also for one
worker). The stop: granian's main process sends each worker SIGTERM (for a
SIGTERM or SIGINT it got); the worker's signal handler, replaced here, starts
dualproxy's drain clock (drain.py) before granian stops accepting. A second
SIGINT to the main process sends the workers SIGQUIT, which ends what is left
at once. granian's own kill comes `SLACK` after the graceful timeout.

An open WebSocket cannot be kept to the graceful timeout: when granian's accept
loop ends it ends every WebSocket handler (`RuntimeRef.close()`: the app's
pending receive gets a disconnect) and it drops its runtime, sockets and all,
as soon as its HTTP connections are done. So the worker's stop closes each open
WebSocket session 1001 both ways first (logged `shutdown-cut`), waits up to
`SLACK` for those closes, and only then lets granian stop; the HTTP exchanges
drain as usual. (A limit of granian 2.8; docs/servers.md lists the others.)

GranianApp, around the app, undoes what its ASGI interface does otherwise than
uvicorn's where that is possible (HTTP/1.0's scope, a request or a response
left unanswered). `--http 2|auto` serves HTTP/2 (granian's own, hyper's).

Settings granian has for the request head: its read timeout
(`--header-timeout`, whole milliseconds) and hyper's read buffer, which bounds
a head's size (hyper answers 431 past it, with no body) and the pieces a
request body reaches the app in (READ_BUFFER: sized for the body; a head
under it but past the core's limits gets the core's 414/431). The module leans on
granian's private worker signal set-up (`granian._signals`): run only on the
release the suite tests (TESTED), refused otherwise.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
from typing import Any

from .. import servers
from ..drain import DRAIN, SLACK
from ..errors import IncompleteBody

# granian's loggers through the root logger, in dualproxy's line format (launch.py).
_LOG_CONFIG: dict[str, Any] = {
    "handlers": {},
    "loggers": {"_granian": {"propagate": True}, "granian.access": {"propagate": True}},
}
# hyper's read buffer (granian's default, hyper's own): a request body reaches the app
# in pieces of at most this size, one receive() each; it also bounds a request head.
# At HEAD_LIMIT (48 KiB) a 100 MiB upload took 2,100 receive() round trips through
# granian's runtime instead of 250, and ran at half the speed. A chunked body comes
# one client chunk a receive() at most, whatever this size (hyper's frames): curl's
# 64 KiB chunks make ~1,860 round trips per 100 MiB, which cost granian alone (an app
# that drops the body) as much CPU as dualproxy's whole upload on uvicorn
# (bench/transfer_ab.py --alone granian).
READ_BUFFER = 8192 + 4096 * 100
# The worker's "end what is left now" signal (a second SIGINT to the main process).
FORCE_SIGNAL = signal.SIGQUIT


def untested_granian() -> str | None:
    """Why `--server granian` cannot run here (not installed, an untested release), or None."""
    version = servers.installed_version("granian")
    if version is None:
        return "--server granian needs granian: pip install 'dualproxy[servers]'"
    if not servers.is_tested("granian"):
        low, high = servers.TESTED["granian"]
        return (f"--server granian needs granian >={'.'.join(map(str, low))},"
                f"<{'.'.join(map(str, high))} (the releases the suite tests), found "
                f"{'.'.join(map(str, version))}")
    return None


def _worker_signals(original: Any) -> Any:
    """granian's `set_loop_signals` for a worker, with the stop starting the drain clock
    and FORCE_SIGNAL ending what is left."""

    def set_loop_signals(loop: Any) -> Any:
        event = original(loop)
        stopping = False

        def stop() -> None:
            # Once only: a worker gets SIGTERM twice when its process group is
            # signalled (once itself, once from the main process), and granian's
            # WorkerSignal.set sends on a crossbeam channel of capacity 1 that
            # nothing reads: the second set() blocks the loop for good.
            nonlocal stopping
            if stopping:
                return
            stopping = True
            DRAIN.begin()
            sessions = DRAIN.cut_upgraded()
            if not sessions:
                event.set()
                return
            waited = asyncio.wait([session.ended for session in sessions], timeout=SLACK)
            loop.create_task(waited).add_done_callback(lambda _: event.set())

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop)
        loop.add_signal_handler(FORCE_SIGNAL, DRAIN.end_now)
        return event

    return set_loop_signals


def serve_granian(load: Any, *, host: str, port: int, workers: int, log_level: str,
                  graceful_timeout: float, header_timeout: float, http: str = "1",
                  certfile: str | None = None, keyfile: str | None = None) -> None:
    """Run granian's ASGI interface; each worker process calls `load()` for its app.

    `certfile`/`keyfile`: serve HTTPS (the scope's scheme is then https).
    """
    from pathlib import Path

    import granian._signals
    from granian.constants import HTTPModes, Interfaces
    from granian.http import HTTP1Settings
    from granian.log import LogLevels
    from granian.server import MPServer

    vars(granian._signals)["set_loop_signals"] = _worker_signals(
        granian._signals.set_loop_signals)

    class Server(MPServer):
        interrupts = 0

        def signal_handler_interrupt(self, *args: Any, **kwargs: Any) -> None:
            """The first SIGINT or SIGTERM is granian's graceful stop; a second SIGINT
            ends what the workers still hold at once."""
            self.interrupts += 1
            if self.interrupts > 1 and args[:1] == (signal.SIGINT,):
                for worker in self.wrks:
                    if worker.inner.pid is not None:
                        try:
                            os.kill(worker.inner.pid, FORCE_SIGNAL)
                        except ProcessLookupError:
                            pass
            super().signal_handler_interrupt(*args, **kwargs)  # type: ignore[no-untyped-call]

    server = Server(
        "dualproxy",  # granian's name for the target; `load` builds the app
        address=host,
        port=port,
        interface=Interfaces.ASGI,
        # `--http`: HTTP/1.1 only by default (with "auto" a request starting with
        # HTTP/2's preface is served as h2c).
        http=HTTPModes(http),
        workers=workers,
        # A worker that died (killed, out of memory) is replaced; granian's default is to
        # stop the whole server.
        respawn_failed_workers=True,
        log_level=LogLevels(log_level),
        log_dictconfig=_LOG_CONFIG,
        log_access=False,  # dualproxy writes its own access line
        http1_settings=HTTP1Settings(header_read_timeout=math.ceil(header_timeout * 1000),
                                     max_buffer_size=READ_BUFFER),
        ssl_cert=Path(certfile) if certfile else None,
        ssl_key=Path(keyfile) if keyfile else None,
        workers_kill_timeout=math.ceil(graceful_timeout + SLACK),
    )
    server.serve(target_loader=lambda _target: GranianApp(load()))


class GranianApp:
    """The app granian runs: `app`, with what granian's ASGI interface does otherwise
    than uvicorn's undone where it can be.

    granian says an HTTP/1.0 request's `http_version` is "1" and gives it an
    empty Host header when it has none, which the core refuses (400) as an
    invalid Host: the version is "1.0" here and that invented field is dropped,
    so such a request gets the upstream's authority as on the other servers (an
    HTTP/1.0 request that sent an empty Host is taken alike).

    granian reports a request body its parser refuses (a bad chunk size, bare CR
    line ends) to the app as the client's disconnect: the core ends the exchange
    as `client-gone`, with nothing sent, and granian would answer a text/plain
    500 itself. The client may well still be there: it gets the core's 400
    problem+json (IncompleteBody), its connection closed; one that left gets
    nothing either way.

    An exchange the core ends after the response head but before any body
    message (the upstream's body broke at once: the core returns without the
    final body message, which uvicorn and gunicorn answer by dropping the
    connection after the head) would get granian's 500 page too, as granian
    sends a head only with the first body message: an empty, unfinished one is
    sent here, so granian sends the head and then drops the connection alike.

    A WebSocket handshake the core refuses with an HTTP answer gets `Connection:
    close` added, so the connection ends after it as on the other servers.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            return await self.app(scope, receive, _refusal_closes(send))  # type: ignore[no-any-return]
        if scope["type"] != "http":
            return await self.app(scope, receive, send)  # type: ignore[no-any-return]
        if scope.get("http_version") == "1":
            scope = _http10(scope)
        started = bodied = False

        def watched_send(message: Any) -> Any:
            # Not a coroutine: granian's own awaitable is awaited (one frame less a send).
            nonlocal started, bodied
            if not (started and bodied):
                started = started or message["type"] == "http.response.start"
                bodied = bodied or message["type"] == "http.response.body"
            return send(message)

        await self.app(scope, receive, watched_send)
        if not started:
            problem = IncompleteBody("the request body ended before it was complete "
                                     "(malformed framing, or the client left)")
            await _send_quietly(send, {"type": "http.response.start", "status": problem.status,
                                       "headers": problem.headers()},
                                {"type": "http.response.body", "body": problem.body()})
        elif not bodied:
            await _send_quietly(send, {"type": "http.response.body", "body": b"",
                                       "more_body": True})


def _refusal_closes(send: Any) -> Any:
    """`send` for a WebSocket scope, a refused handshake's HTTP answer (the core's
    `websocket.http.response`) saying `Connection: close`: granian would keep the
    connection for another request otherwise (hyper closes it after that field)."""

    async def closing_send(message: Any) -> None:
        if message["type"] == "websocket.http.response.start":
            message = {**message, "headers": [*message.get("headers", ()),
                                              (b"connection", b"close")]}
        await send(message)

    return closing_send


def _http10(scope: Any) -> Any:
    """An HTTP/1.0 request's scope as ASGI says it (granian's `http_version` is "1"),
    without the empty Host granian invents for it."""
    headers = scope["headers"]
    if [value for name, value in headers if name.lower() == b"host"] == [b""]:
        headers = [(name, value) for name, value in headers if name.lower() != b"host"]
    return {**scope, "http_version": "1.0", "headers": headers}


async def _send_quietly(send: Any, *messages: Any) -> None:
    try:
        for message in messages:
            await send(message)
    except (OSError, RuntimeError):  # the client is gone indeed
        pass
