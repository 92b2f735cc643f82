"""WSGI on an ASGI server: a2wsgi, plus the two things it does not carry.

a2wsgi's `WSGIMiddleware` runs the WSGI app in a thread pool. It keeps the ASGI
scope in `environ["asgi.scope"]` (the WSGI face reads the raw path and exact
headers from it) but reports a client that disconnects mid-upload as a clean
end of input, and never tells the app that the client went away during the
download. This wrapper raises ClientDisconnected into the reading thread for
the first, and sets the `dualproxy.client_gone` event for the second: watched
from the end of the request body on (so a wait for the upstream's head ends
too), or from the response's start when the upstream answered before the
upload ended (the rest of the body is then never read: dropped here).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, cast

from a2wsgi import WSGIMiddleware

from .core import client_stalled
from .drain import absorb_cancel
from .errors import RESPONSE_ABORTED, ClientDisconnected, UpstreamBroken
from .router import SyncRouter, async_twin
from .types import ASGIApp, Environ, Message, Receive, Scope, Send, StartResponse, WSGIApp
from .wsgi import CLIENT_GONE_KEY, CLIENT_TIMEOUT_KEY, SyncProxy


class WSGIBridge:
    """An ASGI app serving a WSGI app through a2wsgi with disconnects reported.

    WSGI cannot hold a WebSocket on an ASGI server: `websocket` scopes go to
    `websocket` (by default, for a SyncProxy, an AsyncProxy on the same config; for a
    SyncRouter, an AsyncRouter on the same routes).
    """

    def __init__(self, app: WSGIApp, *, threads: int = 32,
                 websocket: ASGIApp | None = None) -> None:
        self.app = app
        self._inner = cast(ASGIApp, WSGIMiddleware(self._wsgi, workers=threads))  # type: ignore[arg-type]
        if websocket is None and isinstance(app, SyncProxy):
            websocket = async_twin(app)
        elif websocket is None and isinstance(app, SyncRouter):
            websocket = app.asgi_twin()
        self.websocket = websocket

    def _wsgi(self, environ: Environ, start_response: StartResponse) -> Any:
        scope = environ.get("asgi.scope")
        if isinstance(scope, dict) and CLIENT_GONE_KEY in scope:
            environ[CLIENT_GONE_KEY] = scope[CLIENT_GONE_KEY]
        return self.app(environ, start_response)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and self.websocket is not None:
            await self.websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            try:
                await self._inner(scope, receive, send)
            except asyncio.CancelledError:  # a forced stop skips lifespan.shutdown
                if not absorb_cancel():
                    raise
            return
        gone = threading.Event()
        scope = dict(scope)
        scope[CLIENT_GONE_KEY] = gone
        has_body = any(n in (b"content-length", b"transfer-encoding")
                       for n, _ in scope["headers"])
        watcher: asyncio.Future[None] | None = None

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    gone.set()
                    return

        async def guarded_receive() -> Message:
            nonlocal watcher
            if watcher is not None:
                # The body is over and the watcher owns receive() (two readers would
                # steal each other's messages): answer as the server would.
                if gone.is_set():
                    raise ClientDisconnected("client went away")
                return {"type": "http.request", "body": b"", "more_body": False}
            if gone.is_set():  # the drain cut the upload (wsgi.UploadCut)
                raise ClientDisconnected("the upload was cut")
            seconds: float | None = scope.get(CLIENT_TIMEOUT_KEY)
            if seconds is None:
                message = await receive()
            else:
                try:
                    message = await asyncio.wait_for(receive(), seconds)
                except asyncio.TimeoutError:
                    raise client_stalled(seconds) from None
            if message["type"] == "http.disconnect":
                gone.set()
                raise ClientDisconnected("client went away")
            if not message.get("more_body", False):
                # From here on only a disconnect can come: watch for it while the
                # WSGI side waits for the upstream's head and streams the answer.
                watcher = asyncio.ensure_future(watch())
            return message

        async def watching_send(message: Message) -> None:
            nonlocal watcher
            if watcher is None and message["type"] == "http.response.start":
                # The app answers, so it reads no more of the body (the WSGI face
                # reads none after the upstream's head): receive() is free to watch.
                watcher = asyncio.ensure_future(watch())
            await send(message)

        if not has_body:
            watcher = asyncio.ensure_future(watch())
        try:
            await self._inner(scope, guarded_receive, watching_send)
        except (UpstreamBroken, ClientDisconnected):
            # Returning without completing the response makes the server drop
            # the connection: the client never sees a cut body as complete.
            RESPONSE_ABORTED.set(True)
        except asyncio.CancelledError:
            gone.set()  # the WSGI thread stops at its next chunk
            if not absorb_cancel():  # past the drain the cut was logged already
                raise
        finally:
            if watcher is not None:
                watcher.cancel()
