"""Soak: many mixed requests through both faces, then check nothing leaked.

    python bench/soak.py [--requests 100000] [--concurrency 16]

For dualproxy asgi on uvicorn and wsgi on gunicorn, in front of the suite's
recording upstream: small GETs, 1 MiB downloads, uploads with and without
Content-Length, SSE, client aborts mid-download, upstream 500s and resets.
Reports unexpected errors (must be 0; injected faults are counted apart and
checked to be answered as they should), RSS of the proxy process tree after
warm-up and at the end (drift < 10%), open file descriptors of the proxy
processes and the upstream's open connections before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import free_port, start, stop, tree_pids, tree_rss_mb, wait_http  # noqa: E402
from tests.upstream import Upstream  # noqa: E402

MiB = 1024 * 1024


def fds(root: int) -> int:
    total = 0
    for pid in tree_pids(root):
        try:
            total += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            pass
    return total


async def abort_download(port: int, rid: str) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /abort HTTP/1.1\r\nHost: soak\r\nx-req-id: {rid}\r\n"
                 f"x-upstream: download size={8 * MiB}\r\n\r\n".encode())
    await reader.read(65536)
    writer.transport.abort()


async def one(client: httpx.AsyncClient, port: int, i: int, counts: collections.Counter[str],
              errors: list[str]) -> None:
    kind = i % 100
    rid = f"soak-{i}"
    try:
        if kind < 70:
            r = await client.get(f"/small/{i}", headers={"x-req-id": rid})
            ok = r.status_code == 200
            counts["small"] += 1
        elif kind < 80:
            r = await client.get("/dl", headers={"x-req-id": rid,
                                                 "x-upstream": f"download size={MiB}"})
            ok = r.status_code == 200 and len(r.content) == MiB
            counts["download"] += 1
        elif kind < 85:
            r = await client.post("/up", content=b"u" * 262144, headers={"x-req-id": rid})
            ok = r.status_code == 200 and r.json()["body_length"] == 262144
            counts["upload-cl"] += 1
        elif kind < 88:
            async def gen() -> object:
                for _ in range(4):
                    yield b"c" * 65536

            r = await client.put("/up", content=gen(), headers={"x-req-id": rid})  # type: ignore[arg-type]
            ok = r.status_code == 200 and r.json()["framing"] == "chunked"
            counts["upload-chunked"] += 1
        elif kind < 90:
            r = await client.get("/sse", headers={"x-req-id": rid,
                                                  "x-upstream": "sse count=3 interval=0.01"})
            ok = r.status_code == 200 and r.text.count("data: ") == 3
            counts["sse"] += 1
        elif kind < 94:
            await abort_download(port, rid)
            ok = True
            counts["fault: client abort"] += 1
        elif kind < 97:
            r = await client.get("/err", headers={"x-req-id": rid,
                                                  "x-upstream": "status code=500"})
            ok = r.status_code == 500
            counts["fault: upstream 500"] += 1
        else:
            r = await client.get("/reset", headers={"x-req-id": rid, "x-upstream": "reset"})
            ok = r.status_code == 502 and r.headers["content-type"] == "application/problem+json"
            counts["fault: upstream reset"] += 1
        if not ok:
            errors.append(f"{rid} kind {kind}: unexpected answer")
    except (httpx.HTTPError, OSError, ValueError, KeyError) as exc:
        errors.append(f"{rid} kind {kind}: {type(exc).__name__}: {exc}")


async def drive(port: int, total: int, concurrency: int, offset: int,
                counts: collections.Counter[str], errors: list[str]) -> None:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(offset, offset + total):
        queue.put_nowait(i)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30,
                                 limits=limits) as client:
        async def worker() -> None:
            while not queue.empty():
                await one(client, port, queue.get_nowait(), counts, errors)

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def soak_face(name: str, flags: list[str], upstream: Upstream, total: int,
              concurrency: int) -> bool:
    port = free_port()
    log = Path(f"/tmp/dualproxy-soak-{name}.log")
    proc = start([sys.executable, "-m", "dualproxy", "serve", "--upstream", upstream.url,
                  "--bind", f"127.0.0.1:{port}", "--no-access-log", "--log-level", "warning",
                  *flags], log=log)
    try:
        if not wait_http(f"http://127.0.0.1:{port}/ready"):
            print(f"{name}: proxy did not start")
            return False
        warm: collections.Counter[str] = collections.Counter()
        asyncio.run(drive(port, 2000, concurrency, 10_000_000, warm, []))
        time.sleep(1)
        rss0, fd0, conns0 = tree_rss_mb(proc.pid), fds(proc.pid), upstream.open_connections()
        counts: collections.Counter[str] = collections.Counter()
        errors: list[str] = []
        started = time.monotonic()
        curve = []
        batch = max(1000, total // 10)
        for offset in range(0, total, batch):
            asyncio.run(drive(port, min(batch, total - offset), concurrency, offset, counts,
                              errors))
            curve.append(f"{tree_rss_mb(proc.pid):.0f}")
        elapsed = time.monotonic() - started
        time.sleep(2)
        rss1, fd1, conns1 = tree_rss_mb(proc.pid), fds(proc.pid), upstream.open_connections()
        drift = (rss1 - rss0) / rss0 * 100
        print(f"\n== {name}: {total} requests in {elapsed:.0f} s ({total / elapsed:,.0f} req/s)")
        for key, value in sorted(counts.items()):
            print(f"   {key:24} {value}")
        print(f"   unexpected errors        {len(errors)}")
        for line in errors[:10]:
            print(f"     {line}")
        print(f"   RSS    {rss0:.1f} MB -> {rss1:.1f} MB ({drift:+.1f}%); "
              f"after each tenth: {' '.join(curve)} MB")
        print(f"   fds    {fd0} -> {fd1}")
        print(f"   upstream connections open {conns0} -> {conns1}")
        # Idle keep-alive connections may legitimately stay pooled: at most one per client.
        ok = (not errors and drift < 10 and fd1 <= fd0 + concurrency
              and conns1 <= conns0 + concurrency and proc.poll() is None)
        print(f"   {'PASS' if ok else 'FAIL'}")
        return ok
    finally:
        stop(proc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000,
                        help="total requests, split between the two faces")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--face", action="append", choices=("asgi-uvicorn", "wsgi-gunicorn"),
                        help="soak only this face (repeatable; default both)")
    opts = parser.parse_args()
    upstream = Upstream().start()
    stop_clearing = threading.Event()

    def clear_records() -> None:
        # The recorder keeps every request (bodies up to 1 MiB); the soak reads none.
        while not stop_clearing.wait(2):
            upstream.reset()

    threading.Thread(target=clear_records, daemon=True).start()
    try:
        faces = [(name, flags) for name, flags in (("asgi-uvicorn", []),
                                                   ("wsgi-gunicorn", ["--adapter", "wsgi"]))
                 if not opts.face or name in opts.face]
        results = [soak_face(name, flags, upstream, opts.requests // len(faces),
                             opts.concurrency) for name, flags in faces]
    finally:
        stop_clearing.set()
        upstream.stop()
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
