"""A FastAPI app with its own routes, an authenticated proxied `/api`, and a legacy
Flask app mounted through a2wsgi: the migration path, one route at a time.

    DUALPROXY_UPSTREAM=http://127.0.0.1:9000 \\
        uvicorn examples.fastapi_app.app:app --no-proxy-headers
"""

from __future__ import annotations

import os

from fastapi import Depends, FastAPI, Header, HTTPException, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dualproxy import AsyncProxy
from dualproxy.bridge import WSGIBridge
from dualproxy.fastapi import proxy_lifespan, proxy_router
from examples.flask_app.app import app as legacy_flask_app

UPSTREAM = os.environ.get("DUALPROXY_UPSTREAM", "http://127.0.0.1:9000")
TOKEN = os.environ.get("EXAMPLE_TOKEN", "secret-token")


async def require_token(authorization: str | None = Header(default=None)) -> None:
    """Bearer-token auth that runs before anything reaches the upstream."""
    if authorization != f"Bearer {TOKEN}":
        raise HTTPException(status_code=401, detail="missing or wrong bearer token")


api_proxy = AsyncProxy(UPSTREAM, metrics=True)  # dualproxy_* on the default registry
app = FastAPI(title="dualproxy FastAPI example", lifespan=proxy_lifespan(api_proxy))


@app.get("/")
async def index() -> dict[str, str]:
    return {"app": "fastapi", "api": "/api (bearer token)", "legacy": "/legacy"}


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/metrics")
async def metrics() -> Response:
    """Prometheus metrics: the proxies' `dualproxy_*` (this app's and the legacy app's)."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


# /api/... is streamed to the upstream after require_token has passed.
app.include_router(proxy_router(None, "/api", dependencies=[Depends(require_token)],
                                proxy=api_proxy))

# The legacy Flask app (with its own proxied /upload area) keeps running under /legacy,
# through a2wsgi. WSGIBridge is a2wsgi's WSGIMiddleware plus what a2wsgi does not carry
# to a streaming WSGI app: a client that disconnects mid-upload or mid-download.
app.mount("/legacy", WSGIBridge(legacy_flask_app, threads=32))  # type: ignore[arg-type]
