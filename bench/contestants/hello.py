"""The servers' ceilings: a hello-world app with nothing behind it, one for each server.

`asgi` runs on uvicorn and `wsgi` on gunicorn gthread with the settings the proxy rows
use, so their small-GET rate is the most any face can reach on that server here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

BODY = b"ok"  # the 2 bytes nginx's /small serves
HEADERS = [(b"content-type", b"text/plain"), (b"content-length", b"2")]


async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})


def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [(k.decode(), v.decode()) for k, v in HEADERS])
    return [BODY]
