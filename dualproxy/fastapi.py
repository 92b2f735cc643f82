"""FastAPI glue: a router form with dependencies in front, and a lifespan helper.

Mounting needs no glue: `app.mount("/api", AsyncProxy(upstream))` works as is
(Starlette keeps the full path and sets `root_path` to the mount, which the
ASGI face strips from the raw path). Use `proxy_router` when FastAPI
dependencies (auth, rate limits) must run before the proxy, and
`proxy_lifespan` to open and close the clients with the app. Both forms proxy
WebSockets too; a router's dependencies run before the upgrade (declare them on
`HTTPConnection`, not `Request`, to serve both), and one that raises
`HTTPException` refuses the handshake with that status.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, params
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from .asgi import AsyncProxy
from .core import PROXY_METHODS

_PATH_PARAM = "dualproxy_path"


class ProxiedResponse(Response):
    """A Response that hands the raw ASGI exchange to the proxy: it streams both ways.

    `mount` is the decoded path prefix the route matched (root_path included);
    the proxy strips it from the raw path.
    """

    def __init__(self, proxy: AsyncProxy, mount: str) -> None:
        self.proxy = proxy
        self.mount = mount
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The core strips root_path from the raw path: make it end at the prefix.
        inner = dict(scope)
        inner["root_path"] = self.mount
        await self.proxy.handle_http(inner, receive, send)


def route_mount(scope: Scope, rest: str | None) -> str:
    """The full path up to the forwarded `rest`: whatever prefixes the router was
    included with (`include_router(prefix=...)`, a Mount, uvicorn's --root-path)."""
    root: str = scope.get("root_path", "")
    path: str = scope["path"]
    if root and not path.startswith(root):
        path = root.rstrip("/") + path  # servers that keep root_path out of path
    return (path[:len(path) - len(rest)] if rest else path).rstrip("/")


def proxy_router(
    upstream: str | None,
    prefix: str,
    *,
    dependencies: Sequence[params.Depends] | None = None,
    proxy: AsyncProxy | None = None,
    **options: Any,
) -> APIRouter:
    """An APIRouter forwarding everything under `prefix`, after `dependencies` ran.

    `app.include_router(proxy_router("http://backend:9000", "/api",
    dependencies=[Depends(require_token)]))`; WebSocket handshakes under the
    prefix are proxied after the same dependencies. Pass `proxy=` (and `None` as the
    upstream) to share an AsyncProxy, e.g. one that `proxy_lifespan` manages.
    The forwarded path is what follows the matched prefix, wherever the router
    is included (`include_router(..., prefix="/v1")`, a mount, `--root-path`).
    """
    prefix = "/" + prefix.strip("/")
    if proxy is None:
        if upstream is None:
            raise TypeError("proxy_router needs an upstream URL or proxy=")
        proxy = AsyncProxy(upstream, **options)
    bound = proxy
    router = APIRouter(dependencies=list(dependencies or ()))

    async def forward(request: Request) -> Response:
        return ProxiedResponse(bound, route_mount(request.scope,
                                                  request.path_params.get(_PATH_PARAM)))

    async def forward_websocket(websocket: WebSocket) -> None:
        # The dependencies ran before this point: one that raised refused the
        # handshake with its status. The raw receive/send go to the proxy, which
        # keeps the handshake's state itself (Starlette's WebSocket wrapper would
        # turn a vanished client into an exception the relay does not expect).
        inner = dict(websocket.scope)
        inner["root_path"] = route_mount(websocket.scope,
                                         websocket.path_params.get(_PATH_PARAM))
        await bound(inner, websocket._receive, websocket._send)

    for path in (prefix, prefix.rstrip("/") + "/{" + _PATH_PARAM + ":path}"):
        router.add_api_route(path, forward, methods=list(PROXY_METHODS),
                             include_in_schema=False)
        router.add_api_websocket_route(path, forward_websocket)
    return router


def proxy_lifespan(
    *proxies: AsyncProxy,
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """`FastAPI(lifespan=proxy_lifespan(p1, p2))`: clients open at startup, close at shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for proxy in proxies:
            _ = proxy.client
        try:
            yield
        finally:
            for proxy in proxies:
                await proxy.aclose()

    return lifespan
