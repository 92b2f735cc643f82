"""The seed pattern's sync twin: Flask + one httpx.Client + a generator.

Benchmark contestant only; the upstream comes from BENCH_UPSTREAM.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
from flask import Flask, Response, request

UPSTREAM = os.environ.get("BENCH_UPSTREAM", "http://127.0.0.1:9100")
client = httpx.Client(base_url=UPSTREAM, timeout=None)
app = Flask(__name__)


def body() -> Iterator[bytes]:
    while True:
        chunk = request.stream.read(65536)
        if not chunk:
            return
        yield chunk


@app.route("/", defaults={"path": ""}, methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
@app.route("/<path:path>", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
def proxy(path: str) -> Response:
    headers = [(k, v) for k, v in request.headers.items() if k.lower() != "host"]
    has_body = request.content_length or request.headers.get("Transfer-Encoding")
    req = client.build_request(request.method, "/" + path, params=request.query_string,
                               headers=headers, content=body() if has_body else None)
    r = client.send(req, stream=True)

    def relay() -> Iterator[bytes]:
        try:
            yield from r.iter_raw()
        finally:
            r.close()

    return Response(relay(), status=r.status_code, headers=list(r.headers.items()))
