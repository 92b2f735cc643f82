"""The seed pattern: the common httpx + FastAPI proxy recipe, as users copy it.

Benchmark contestant only (BASELINE.md describes it); the upstream comes from
BENCH_UPSTREAM.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

UPSTREAM = os.environ.get("BENCH_UPSTREAM", "http://127.0.0.1:9100")
client: httpx.AsyncClient


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    global client
    client = httpx.AsyncClient(base_url=UPSTREAM, timeout=None)
    yield
    await client.aclose()


app = FastAPI(lifespan=lifespan)


@app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"])
async def proxy(request: Request, path: str) -> StreamingResponse:
    url = httpx.URL(path="/" + path, query=request.url.query.encode())
    req = client.build_request(request.method, url, headers=request.headers.raw,
                               content=request.stream())
    r = await client.send(req, stream=True)
    return StreamingResponse(r.aiter_raw(), status_code=r.status_code, headers=r.headers,
                             background=BackgroundTask(r.aclose))
