"""`dualproxy demo`: a built-in upstream and the proxy in front of it.

The upstream is a small ASGI app (run by uvicorn in a child process) with a
streamed download, an upload sink that reports the SHA-256 it received, an SSE
clock, a WebSocket chat (every message goes back to every open socket: an echo
with one), and a page at `/` that tries all four from a browser, so the things
people doubt about a proxy can be seen at once.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import html
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from typing import Any

from .types import Message, Receive, Scope, Send

_BLOCK = bytes(range(256)) * 256  # 64 KiB
DOWNLOAD_SIZE = 100 * 1024 * 1024  # the printed curl command's download
_SHOWN_HEADERS = (b"host", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
                  b"forwarded")
_chat_room: set[Send] = set()  # the open WebSockets of this upstream process


def _query(scope: Scope) -> dict[str, str]:
    pairs = scope.get("query_string", b"").decode("latin-1").split("&")
    return dict(p.partition("=")[::2] for p in pairs if p)


def download_blocks(size: int) -> Any:
    """The bytes of /download?size=N, block by block (the same every time)."""
    while size > 0:
        block = _BLOCK[:size]
        size -= len(block)
        yield block


@functools.lru_cache(maxsize=8)
def download_sha256(size: int) -> str:
    """The SHA-256 of /download?size=N, to compare with what arrived."""
    digest = hashlib.sha256()
    for block in download_blocks(size):
        digest.update(block)
    return digest.hexdigest()


async def upstream_app(scope: Scope, receive: Receive, send: Send) -> None:
    """The demo upstream: / (the page), /download?size=N, /upload, /events[?count=N], /ws."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["type"] == "websocket":
        await _chat(receive, send)
        return
    path = scope["path"]
    if path == "/download":
        size = int(_query(scope).get("size", str(DOWNLOAD_SIZE)))
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/octet-stream"),
            (b"content-length", str(size).encode()),
            (b"x-content-sha256", download_sha256(size).encode())]})
        if size <= 0:
            await send({"type": "http.response.body", "body": b""})
        for block in download_blocks(size):
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
        await _clock(scope, receive, send)
        return
    if path == "/":
        await _respond(send, 200, b"text/html; charset=utf-8", _page(scope))
        return
    text = b"dualproxy demo upstream: try /, /download?size=N, /upload, /events, /ws\n"
    await _respond(send, 404, b"text/plain", text)


def _page(scope: Scope) -> bytes:
    """The demo page, with the request headers that show the proxy was on the way."""
    page = resources.files("dualproxy").joinpath("demo_page.html").read_text("utf-8")
    seen = [f"{name.decode()}: {value.decode('latin-1')}"
            for name, value in scope["headers"] if name in _SHOWN_HEADERS]
    return page.replace("{{headers}}", html.escape("\n".join(seen))).encode()


async def _clock(scope: Scope, receive: Receive, send: Send) -> None:
    """One SSE event a second, `count` of them or until the client leaves."""
    count = _query(scope).get("count")
    limit = int(count) if count else None
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})

    async def client_gone() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    gone = asyncio.ensure_future(client_gone())
    try:
        i = 0
        while limit is None or i < limit:
            event = f"id: {i}\ndata: {time.strftime('%H:%M:%S')} tick {i}\n\n".encode()
            await send({"type": "http.response.body", "body": event, "more_body": True})
            i += 1
            done, _ = await asyncio.wait({gone}, timeout=1)
            if done:
                return
        await send({"type": "http.response.body", "body": b""})
    finally:
        gone.cancel()


async def _chat(receive: Receive, send: Send) -> None:
    """A chat room: each message (text or binary) goes to every open socket."""
    if (await receive())["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    _chat_room.add(send)
    try:
        while True:
            message = await receive()
            if message["type"] != "websocket.receive":
                return
            out: Message = {"type": "websocket.send"}
            if message.get("text") is not None:
                out["text"] = message["text"]
            else:
                out["bytes"] = message.get("bytes") or b""
            for peer in list(_chat_room):
                try:
                    await peer(out)
                except Exception:  # a peer that left; its own loop ends it
                    _chat_room.discard(peer)
    finally:
        _chat_room.discard(send)


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
    """What the demo prints: where things run, the page, and commands to try."""
    ws_url = "ws" + url.removeprefix("http")
    return f"""
dualproxy demo: upstream on http://127.0.0.1:{port}, proxy ({adapter}) on {url}

Open {url}/ in a browser: an upload, a download, a live clock and a WebSocket chat,
all through the proxy. Or try, in another terminal:
  # a streamed {DOWNLOAD_SIZE >> 20} MiB download, hashed on arrival; sha256sum should print
  #   {download_sha256(DOWNLOAD_SIZE)}  -
  curl -s {url}/download?size={DOWNLOAD_SIZE} | sha256sum
  # a 50 MiB streamed upload; the upstream answers with the hash it received
  head -c 52428800 /dev/urandom > /tmp/dp.bin && sha256sum /tmp/dp.bin && \\
    curl -s -T /tmp/dp.bin -H 'Transfer-Encoding: chunked' {url}/upload
  # a Server-Sent Events clock, one event a second until you stop it, relayed as it happens
  curl -sN {url}/events
  # the WebSocket chat: type a line, it comes back (and reaches every open page)
  python -m websockets {ws_url}/ws

Ctrl-C stops both.
"""
