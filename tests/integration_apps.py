"""Small apps for the integration tests: the mount, router and middleware forms.

The upstream comes from DUALPROXY_UPSTREAM, as in the examples.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from flask import Flask

from dualproxy import AsyncProxy
from dualproxy.fastapi import proxy_lifespan, proxy_router
from dualproxy.flask import FlaskProxy, proxy_blueprint, wrap_wsgi_app

UPSTREAM = os.environ.get("DUALPROXY_UPSTREAM", "http://127.0.0.1:9")

# FastAPI, mount form: Starlette sets root_path=/mnt and keeps the full path.
mounted_proxy = AsyncProxy(UPSTREAM + "/base")
# Router form, included under a further prefix: /v1/r/x goes to /routed/x.
routed_proxy = AsyncProxy(UPSTREAM + "/routed")


@asynccontextmanager
async def observed_lifespan(app: FastAPI) -> AsyncIterator[None]:
    """proxy_lifespan, telling the test (on stdout) what it did to the clients."""
    async with proxy_lifespan(mounted_proxy, routed_proxy)(app):
        clients = [mounted_proxy.client, routed_proxy.client]
        opened = mounted_proxy._client is not None and routed_proxy._client is not None
        print(f"lifespan: clients open at startup: {opened}", flush=True)
        yield
    closed = all(client.is_closed for client in clients)
    gone = mounted_proxy._client is None and routed_proxy._client is None
    print(f"lifespan: clients closed at shutdown: {closed and gone}", flush=True)


fastapi_mount = FastAPI(lifespan=observed_lifespan)
fastapi_mount.mount("/mnt", mounted_proxy)
fastapi_mount.include_router(proxy_router("", "/r", proxy=routed_proxy), prefix="/v1")


@fastapi_mount.get("/own")
async def own() -> dict[str, str]:
    return {"served_by": "fastapi"}


# Flask, WSGI-middleware form: /files is proxied, everything else reaches Flask,
# including a blueprint registered (and nested) under prefixes of its own choosing.
flask_middleware = Flask(__name__)


@flask_middleware.get("/own")
def flask_own() -> str:
    return "served by flask"


store = proxy_blueprint("store", UPSTREAM + "/bp", "/ignored")
flask_middleware.register_blueprint(store, url_prefix="/tenant/store")
wrap_wsgi_app(flask_middleware, UPSTREAM, "/files")


# Flask, two extensions in one app: each gets a blueprint name of its own.
flask_two_proxies = Flask(__name__)
FlaskProxy(flask_two_proxies, upstream=UPSTREAM + "/one", prefix="/one")
FlaskProxy(flask_two_proxies, upstream=UPSTREAM + "/two", prefix="/two")


# FastAPI behind `dualproxy serve --mount /api`: the app takes its root_path from
# X-Forwarded-Prefix (a small middleware, as uvicorn's --root-path would set it:
# the path then carries the prefix too), so its links (url_for, the docs page's
# openapi.json URL) name the mount.
class ForwardedPrefixMiddleware:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            prefix = next((value.decode("latin-1") for name, value in scope["headers"]
                           if name == b"x-forwarded-prefix"), "").rstrip("/")
            if prefix:
                scope = {**scope, "root_path": prefix + scope.get("root_path", ""),
                         "path": prefix + scope["path"]}
        await self.app(scope, receive, send)


fastapi_prefixed = FastAPI()
fastapi_prefixed.add_middleware(ForwardedPrefixMiddleware)


@fastapi_prefixed.get("/items/{item_id}", name="item")
async def item(item_id: int, request: Request) -> dict[str, Any]:
    return {"item": item_id, "url": str(request.url_for("item", item_id=item_id)),
            "root_path": request.scope.get("root_path", "")}
