"""`dualproxy demo`: a built-in upstream and the proxy in front of it.

The upstream is a small ASGI app (run by uvicorn in a child process) with a
streamed download, an upload sink that reports the SHA-256 it received, and an
SSE clock, so the three things people doubt about a proxy can be tried at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .types import Receive, Scope, Send

_BLOCK = bytes(range(256)) * 256  # 64 KiB


def _query(scope: Scope) -> dict[str, str]:
    pairs = scope.get("query_string", b"").decode("latin-1").split("&")
    return dict(p.partition("=")[::2] for p in pairs if p)


async def upstream_app(scope: Scope, receive: Receive, send: Send) -> None:
    """The demo upstream: /download?size=N, /upload (POST/PUT), /events, / (index)."""
    if scope["type"] != "http":
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
        return
    path = scope["path"]
    if path == "/download":
        size = int(_query(scope).get("size", str(100 * 1024 * 1024)))
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/octet-stream"),
            (b"content-length", str(size).encode())]})
        if size <= 0:
            await send({"type": "http.response.body", "body": b""})
        while size > 0:
            block = _BLOCK[:size]
            size -= len(block)
            await send({"type": "http.response.body", "body": block, "more_body": size > 0})
        return
    if path == "/upload":
        digest, total = hashlib.sha256(), 0
        while True:
            message = await receive()
            digest.update(message.get("body", b""))
            total += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = json.dumps({"received_bytes": total, "sha256": digest.hexdigest()}).encode()
        await _respond(send, 200, b"application/json", body + b"\n")
        return
    if path == "/events":
        count = int(_query(scope).get("count", "5"))
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
        for i in range(count):
            event = f"id: {i}\ndata: {time.strftime('%H:%M:%S')} tick {i}\n\n".encode()
            await send({"type": "http.response.body", "body": event, "more_body": True})
            await asyncio.sleep(1)
        await send({"type": "http.response.body", "body": b""})
        return
    text = b"dualproxy demo upstream: try /download?size=N, /upload, /events\n"
    await _respond(send, 200 if path == "/" else 404, b"text/plain", text)


async def _respond(send: Send, status: int, ctype: bytes, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", ctype), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"demo upstream did not start on port {port}")


@contextmanager
def demo_upstream() -> Iterator[int]:
    """The demo upstream in a uvicorn child process, on a free port; stopped on exit."""
    port = _free_port()
    child = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "dualproxy.demo:upstream_app",
         "--port", str(port), "--log-level", "warning", "--no-access-log"],
        env={**os.environ},
    )
    try:
        _wait_port(port)
        yield port
    finally:
        child.terminate()
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            child.kill()


def instructions(port: int, url: str, adapter: str) -> str:
    """What the demo prints: where things run and three curl commands to try."""
    return f"""
dualproxy demo: upstream on http://127.0.0.1:{port}, proxy ({adapter}) on {url}

Try, in another terminal:
  # a streamed 100 MiB download, hashed on arrival
  curl -s {url}/download?size=104857600 | sha256sum
  # a 50 MiB streamed upload; the upstream answers with the hash it received
  head -c 52428800 /dev/urandom > /tmp/dp.bin && sha256sum /tmp/dp.bin && \\
    curl -s -T /tmp/dp.bin -H 'Transfer-Encoding: chunked' {url}/upload
  # a Server-Sent Events stream, one event a second, relayed as it happens
  curl -sN {url}/events

Ctrl-C stops both.
"""
