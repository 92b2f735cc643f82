"""A small keep-alive load generator, used only when wrk is not installed.

Several processes, each with asyncio raw-socket connections issuing GETs
back to back; reports req/s and p50/p99 latency like wrk's --latency.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from urllib.parse import urlsplit


async def _conn(host: str, port: int, path: str, deadline: float, lat: list[float]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    while time.monotonic() < deadline:
        started = time.perf_counter()
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await reader.readexactly(length)
        lat.append(time.perf_counter() - started)
    writer.close()


def _worker(url: str, conns: int, seconds: float, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    parts = urlsplit(url)
    lat: list[float] = []

    async def main() -> None:
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(_conn(parts.hostname or "127.0.0.1", parts.port or 80,
                                     parts.path or "/", deadline, lat) for _ in range(conns)))

    asyncio.run(main())
    queue.put(lat)


def run_load(url: str, connections: int = 32, seconds: float = 8,
             procs: int = 2) -> dict[str, float]:
    queue: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
    workers = [multiprocessing.Process(target=_worker, args=(url, connections // procs, seconds,
                                                             queue)) for _ in range(procs)]
    for w in workers:
        w.start()
    lat = sorted(x for _ in workers for x in queue.get())
    for w in workers:
        w.join()
    if not lat:
        return {"rps": 0.0, "p50_ms": float("nan"), "p99_ms": float("nan"), "errors": 0}
    return {"rps": len(lat) / seconds, "p50_ms": lat[len(lat) // 2] * 1000,
            "p99_ms": lat[int(len(lat) * 0.99)] * 1000, "errors": 0}
