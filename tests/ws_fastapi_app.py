"""A FastAPI app proxying WebSockets in both glue forms (the upstream from DUALPROXY_UPSTREAM).

/mnt is `app.mount` of an AsyncProxy; /v1/r is `proxy_router` behind a token
dependency, declared on HTTPConnection so it serves HTTP and WebSocket alike.
`outer` is an AsyncProxy mounted at /p that falls back to `app` elsewhere.
"""

from __future__ import annotations

import os

from fastapi import Depends, FastAPI, HTTPException, WebSocket
from starlette.requests import HTTPConnection

from dualproxy import AsyncProxy
from dualproxy.fastapi import proxy_router

UPSTREAM = os.environ.get("DUALPROXY_UPSTREAM", "http://127.0.0.1:9")


def require_token(connection: HTTPConnection) -> None:
    if connection.headers.get("authorization") != "Bearer t":
        raise HTTPException(status_code=401, detail="token required")


app = FastAPI()
app.mount("/mnt", AsyncProxy(UPSTREAM + "/base"))
app.include_router(proxy_router(UPSTREAM + "/routed", "/r",
                                dependencies=[Depends(require_token)]), prefix="/v1")


@app.get("/own")
async def own() -> dict[str, str]:
    return {"served_by": "fastapi"}


@app.websocket("/own-ws")
async def own_ws(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text("served by fastapi")
    await websocket.close()


outer = AsyncProxy(UPSTREAM + "/outer", mount="/p", fallback=app)
