"""A small keep-alive HTTP/1.1 load generator, used only when wrk is not installed.

Several processes, each running an event loop (uvloop when installed) with raw
asyncio Protocol connections that issue GETs back to back, like
`wrk -t1 -cN --latency`. A connection the server closes is reopened; broken
exchanges and non-2xx/3xx answers are counted as errors. Returns req/s and the
p50/p99 latency in ms.

    python -m bench.loadgen URL [--connections 32] [--seconds 8]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import queue as queue_mod
import time
from typing import Any, cast
from urllib.parse import urlsplit


def parse_response(buf: bytearray) -> tuple[int, int, bool] | None:
    """(bytes consumed, status, server closes) of one complete response in buf, else None."""
    head_end = buf.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    lines = bytes(buf[:head_end]).split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length, chunked, close = 0, False, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and value.endswith(b"chunked"):
            chunked = True
        elif name == b"connection" and value == b"close":
            close = True
    pos = head_end + 4
    if not chunked:
        return (pos + length, status, close) if len(buf) >= pos + length else None
    while True:
        line_end = buf.find(b"\r\n", pos)
        if line_end < 0:
            return None
        size = int(bytes(buf[pos:line_end]).split(b";")[0], 16)
        if size == 0:
            end = buf.find(b"\r\n\r\n", line_end)
            return (end + 4, status, close) if end >= 0 else None
        pos = line_end + 2 + size + 2
        if pos > len(buf):
            return None


class _Conn(asyncio.Protocol):
    def __init__(self, request: bytes, deadline: float, lat: list[float],
                 stats: dict[str, int]) -> None:
        self.request, self.deadline, self.lat, self.stats = request, deadline, lat, stats
        self.buf = bytearray()
        self.started = 0.0
        self.in_flight = False
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        if time.monotonic() >= self.deadline:
            self.transport.close()
            return
        self.in_flight = True
        self.started = time.perf_counter()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        try:
            parsed = parse_response(self.buf)
        except (ValueError, IndexError):
            self.stats["errors"] += 1
            assert self.transport is not None
            self.transport.close()
            return
        if parsed is None:
            return
        used, status, close = parsed
        del self.buf[:used]
        self.in_flight = False
        self.lat.append(time.perf_counter() - self.started)
        if status >= 400:
            self.stats["errors"] += 1
        assert self.transport is not None
        if close:
            self.transport.close()
        else:
            self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.in_flight and time.monotonic() < self.deadline:
            self.stats["errors"] += 1
        if not self.lost.done():
            self.lost.set_result(None)


async def _connection(host: str, port: int, request: bytes, deadline: float,
                      lat: list[float], stats: dict[str, int]) -> None:
    loop = asyncio.get_running_loop()
    while time.monotonic() < deadline:
        try:
            _, proto = await asyncio.wait_for(loop.create_connection(
                lambda: _Conn(request, deadline, lat, stats), host, port), timeout=5)
        except (OSError, asyncio.TimeoutError):
            stats["errors"] += 1
            await asyncio.sleep(0.05)
            continue
        try:
            # A response slower than the whole run is an error, not a hang.
            await asyncio.wait_for(asyncio.shield(proto.lost),
                                   timeout=max(deadline - time.monotonic(), 0) + 10)
        except asyncio.TimeoutError:
            stats["errors"] += 1
            if proto.transport is not None:
                proto.transport.abort()
            return


def _worker(url: str, conns: int, seconds: float, out: Any, headers: tuple[str, ...] = ()
            ) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    extra = "".join(f"{header}\r\n" for header in headers)
    request = f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n{extra}\r\n".encode()
    lat: list[float] = []
    stats = {"errors": 0}

    async def main() -> None:
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(_connection(host, port, request, deadline, lat, stats)
                               for _ in range(conns)))

    asyncio.run(main())
    out.put((lat, stats["errors"]))


def run_load(url: str, connections: int = 32, seconds: float = 8,
             procs: int | None = None, headers: tuple[str, ...] = ()) -> dict[str, float]:
    """Small GETs over `connections` keep-alive connections spread over `procs` processes."""
    procs = procs or max(2, min(4, os.cpu_count() or 2))
    procs = min(procs, connections)
    out: Any = multiprocessing.Queue()
    shares = [connections // procs + (1 if i < connections % procs else 0) for i in range(procs)]
    workers = [multiprocessing.Process(target=_worker, args=(url, n, seconds, out, headers),
                                       daemon=True)
               for n in shares]
    for w in workers:
        w.start()
    lat: list[float] = []
    errors = 0
    try:
        for _ in workers:
            part, errs = out.get(timeout=seconds + 30)
            lat += part
            errors += errs
    except queue_mod.Empty:
        errors += 1
    finally:
        for w in workers:
            w.join(timeout=5)
            if w.is_alive():
                w.kill()
    lat.sort()
    if not lat:
        return {"rps": 0.0, "p50_ms": float("nan"), "p99_ms": float("nan"),
                "errors": float(errors)}
    return {"rps": len(lat) / seconds, "p50_ms": lat[len(lat) // 2] * 1000,
            "p99_ms": lat[min(int(len(lat) * 0.99), len(lat) - 1)] * 1000,
            "errors": float(errors)}


def main() -> None:
    parser = argparse.ArgumentParser(description="keep-alive GET load, like wrk --latency")
    parser.add_argument("url")
    parser.add_argument("--connections", "-c", type=int, default=32)
    parser.add_argument("--seconds", "-d", type=float, default=8)
    parser.add_argument("--procs", type=int, default=None)
    opts = parser.parse_args()
    result = run_load(opts.url, opts.connections, opts.seconds, opts.procs)
    print(f"{result['rps']:,.0f} req/s  p50 {result['p50_ms']:.2f} ms  "
          f"p99 {result['p99_ms']:.2f} ms  errors {result['errors']:.0f}")


if __name__ == "__main__":
    main()
