"""Fallback benchmark upstream when nginx is not installed: static files and a sink.

Serves BENCH_WWW's files by name (streamed in 1 MiB blocks; under /cached/ with
`Cache-Control: public, max-age=3600`, for the cache rows) and answers 200 to
anything sent to /sink only after reading the whole body, with the number of
bytes it received in X-Received-Length (as the nginx sink does).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

WWW = Path(os.environ.get("BENCH_WWW", "."))


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    if scope["path"] == "/sink":
        received = 0
        while True:
            message = await receive()
            received += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"2"),
                                (b"x-received-length", str(received).encode())]})
        await send({"type": "http.response.body", "body": b"ok"})
        return
    name = scope["path"].lstrip("/")
    cached = name.startswith("cached/")  # the cache rows: cacheable for an hour (as nginx)
    name = name.removeprefix("cached/")
    path = WWW / name
    if "/" in name or not path.is_file():
        await send({"type": "http.response.start", "status": 404,
                    "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})
        return
    size = path.stat().st_size
    ctype = b"application/json" if path.suffix == ".json" else b"application/octet-stream"
    headers = [(b"content-length", str(size).encode()), (b"content-type", ctype)]
    if cached:
        headers.append((b"cache-control", b"public, max-age=3600"))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            await send({"type": "http.response.body", "body": block, "more_body": True})
    await send({"type": "http.response.body", "body": b""})
