"""Soak: many mixed requests through both faces, then check that nothing leaked.

    python bench/soak.py [--requests 100000] [--concurrency 16] [--face asgi-uvicorn]
    python bench/soak.py --face wsgi-uvicorn --face asgi-gunicorn   # the cross pairings

dualproxy asgi on uvicorn and wsgi on gunicorn, each in front of the suite's
recording upstream (tests/upstream.py, in a process of its own), driven by
concurrent keep-alive clients on raw asyncio sockets. The mix: small GETs,
1-10 MiB downloads (Content-Length and chunked), uploads with and without
Content-Length, SSE, and injected faults: upstream 500s, upstream resets (502),
upstream cut mid-body (the client must see an aborted body), clients that
abort mid-download and mid-upload. Every answer is checked (status, target,
body hash); faults are counted apart and checked to be answered as they should.

Per face it reports the unexpected errors (must be 0), the RSS of the proxy
process tree after warm-up and at the end (drift < 10%), the open file
descriptors of the proxy processes not explained by pooled upstream
connections (back to baseline), the upstream's open connections (back to
baseline), and tracebacks in the proxy's log (must be 0). Exit status 0 only
if every face passes. `--requests` is the total, split between the faces.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import json
import multiprocessing
import multiprocessing.connection
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.proctree import open_fds, rss_mb  # noqa: E402
from tests.upstream import pattern_bytes, pattern_sha256  # noqa: E402

KiB, MiB = 1 << 10, 1 << 20
FACES = {
    "asgi-uvicorn": ["--adapter", "asgi", "--server", "uvicorn"],
    "wsgi-gunicorn": ["--adapter", "wsgi", "--server", "gunicorn"],
}
# The cross pairings, on request (`--face wsgi-uvicorn`); the default soaks one per face.
CROSS = {
    "wsgi-uvicorn": ["--adapter", "wsgi", "--server", "uvicorn"],
    "asgi-gunicorn": ["--adapter", "asgi", "--server", "gunicorn"],
}
# Weights per 1000 requests. Faults are named "fault: ..." and counted apart.
MIX = [
    ("small", 720),
    ("download", 30),
    ("upload-length", 60),
    ("upload-chunked", 50),
    ("sse", 40),
    ("fault: upstream 500", 25),
    ("fault: upstream reset", 20),
    ("fault: upstream cut mid-body", 15),
    ("fault: client aborts download", 25),
    ("fault: client aborts upload", 15),
]
UPLOAD_SIZES = (16 * KiB, 64 * KiB, 256 * KiB, MiB)
PIECE = 64 * KiB
RSS_DRIFT_LIMIT = 10.0  # percent


# -- the upstream, in a process of its own ----------------------------------------------------


def upstream_main(conn: multiprocessing.connection.Connection) -> None:
    from tests.upstream import Upstream

    upstream = Upstream().start()
    stop = threading.Event()

    def forget() -> None:
        # The recorder keeps every request (bodies up to 1 MiB); the soak reads none.
        while not stop.wait(1.0):
            upstream.reset()

    threading.Thread(target=forget, daemon=True).start()
    conn.send(upstream.url)
    while True:
        command = conn.recv()
        if command == "open":
            conn.send(upstream.open_connections())
        elif command == "stop":
            stop.set()
            upstream.stop()
            conn.send(None)
            return


class UpstreamProcess:
    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.proc = context.Process(target=upstream_main, args=(child,), daemon=True)
        self.proc.start()
        self.url: str = self.conn.recv()

    def open_connections(self) -> int:
        self.conn.send("open")
        return int(self.conn.recv())

    def stop(self) -> None:
        self.conn.send("stop")
        self.conn.recv()
        self.proc.join(10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_proxy(face: str, upstream: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "dualproxy", "serve", "--upstream", upstream,
            "--bind", f"127.0.0.1:{port}", *(FACES | CROSS)[face], "--timeout", "10",
            "--idle-timeout", "30", "--no-access-log", "--log-level", "warning"]
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"GET /ready HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n")
                if sock.recv(12).startswith(b"HTTP/1.1"):
                    return proc
        except OSError:
            time.sleep(0.1)
    stop_proxy(proc)
    raise RuntimeError(f"{face} did not start:\n{log.read_text(errors='replace')}")


def stop_proxy(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# -- the clients ------------------------------------------------------------------------------


class Incomplete(Exception):
    """The response ended before its framing said it would."""


@dataclass
class Response:
    status: int
    headers: dict[bytes, bytes]
    body: bytes = b""
    digest: str = ""
    length: int = 0


class Client:
    """One keep-alive connection to the proxy, reopened after a close."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.reader is None or self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(
                "127.0.0.1", self.port, limit=MiB)
            self.writer.get_extra_info("socket").setsockopt(
                socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self.reader, self.writer

    def drop(self) -> None:
        if self.writer is not None:
            self.writer.transport.abort()
        self.reader = self.writer = None

    async def request(self, head: bytes, body: bytes | memoryview | None = None,
                      chunks: Iterator[memoryview] | None = None, *,
                      hashed: bool = False) -> Response:
        reader, writer = await self.connect()
        writer.write(head)
        if body is not None:
            writer.write(body)
        if chunks is not None:
            for piece in chunks:
                writer.write(b"%x\r\n" % len(piece))
                writer.write(piece)
                writer.write(b"\r\n")
                await writer.drain()
            writer.write(b"0\r\n\r\n")
        await writer.drain()
        response = await read_response(reader, hashed)
        if response.headers.get(b"connection", b"").lower() == b"close":
            self.drop()
        return response

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
        self.reader = self.writer = None


async def read_response(reader: asyncio.StreamReader, hashed: bool) -> Response:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].split(b"\r\n")
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    response = Response(int(lines[0].split(b" ", 2)[1]), headers)
    digest = hashlib.sha256()
    parts: list[bytes] = []

    def sink(data: bytes) -> None:
        response.length += len(data)
        if hashed:
            digest.update(data)
        else:
            parts.append(data)

    await read_body(reader, headers, sink)
    response.digest = digest.hexdigest() if hashed else ""
    response.body = b"".join(parts)
    return response


async def read_exact(reader: asyncio.StreamReader, n: int, sink: Callable[[bytes], None]) -> None:
    while n:
        data = await reader.read(min(n, MiB))
        if not data:
            raise Incomplete("connection closed inside the body")
        sink(data)
        n -= len(data)


async def read_body(reader: asyncio.StreamReader, headers: dict[bytes, bytes],
                    sink: Callable[[bytes], None]) -> None:
    if b"content-length" in headers:
        await read_exact(reader, int(headers[b"content-length"]), sink)
    elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        while True:
            line = await reader.readline()
            if not line.endswith(b"\r\n"):
                raise Incomplete("connection closed before the last chunk")
            size = int(line.split(b";")[0], 16)
            if size == 0:
                while (trailer := await reader.readline()) != b"\r\n":
                    if not trailer:
                        raise Incomplete("connection closed inside the trailers")
                return
            await read_exact(reader, size, sink)
            if await reader.readexactly(2) != b"\r\n":
                raise Incomplete("bad chunk ending")
    # 1xx/204/304 or a HEAD answer: no body (the soak sends no HEAD)


def head(method: str, target: str, *extra: str) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: soak.test", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


PATTERN = memoryview(pattern_bytes(MiB))


def pieces(size: int) -> Iterator[memoryview]:
    for offset in range(0, size, PIECE):
        yield PATTERN[offset:min(size, offset + PIECE)]


def echo(response: Response) -> dict[str, object]:
    if response.status != 200:
        raise AssertionError(f"status {response.status}")
    doc: dict[str, object] = json.loads(response.body)
    return doc


async def run_one(client: Client, kind: str, i: int, rng: random.Random) -> None:
    """One request of the given kind; raises AssertionError/Incomplete/OSError when wrong."""
    rid = f"x-req-id: soak-{i}"
    if kind == "small":
        target = f"/small/{i}?q={i}&flag"
        doc = echo(await client.request(head("GET", target, rid)))
        assert doc["target"] == target and doc["method"] == "GET", doc
    elif kind == "download":
        size = rng.randrange(1, 11) * MiB - rng.randrange(1000)
        chunked = " chunked=1 chunk=262144" if i % 2 else ""
        response = await client.request(
            head("GET", f"/dl/{i}", rid, f"x-upstream: download size={size}{chunked}"),
            hashed=True)
        received = (response.status, response.length, response.digest)
        assert received == (200, size, pattern_sha256(size)), received
    elif kind == "upload-length":
        size = rng.choice(UPLOAD_SIZES)
        doc = echo(await client.request(
            head("POST", f"/up/{i}", rid, f"Content-Length: {size}"), PATTERN[:size]))
        got = (doc["framing"], doc["body_length"], doc["body_sha256"])
        assert got == ("content-length", size, pattern_sha256(size)), got
    elif kind == "upload-chunked":
        size = rng.choice(UPLOAD_SIZES)
        doc = echo(await client.request(
            head("PUT", f"/up/{i}", rid, "Transfer-Encoding: chunked"), chunks=pieces(size)))
        got = (doc["framing"], doc["body_length"], doc["body_sha256"])
        assert got == ("chunked", size, pattern_sha256(size)), got
    elif kind == "sse":
        response = await client.request(
            head("GET", f"/sse/{i}", rid, "x-upstream: sse count=3 interval=0.005"))
        events = b"".join(b"data: event-%d\n\n" % n for n in range(3))
        assert (response.status, response.body) == (200, events), response
    elif kind == "fault: upstream 500":
        response = await client.request(head("GET", f"/err/{i}", rid,
                                             "x-upstream: status code=500"))
        assert (response.status, response.body) == (500, b"status 500"), response
    elif kind == "fault: upstream reset":
        response = await client.request(head("GET", f"/reset/{i}", rid, "x-upstream: reset"))
        assert response.status == 502, response.status
        assert response.headers.get(b"content-type") == b"application/problem+json"
    elif kind == "fault: upstream cut mid-body":
        try:
            response = await client.request(head(
                "GET", f"/cut/{i}", rid, f"x-upstream: cut size={MiB} after={256 * KiB}"),
                hashed=True)
        except (Incomplete, asyncio.IncompleteReadError, ConnectionError):
            client.drop()  # the proxy aborted the connection: as it must
        else:
            raise AssertionError(f"a cut body was passed off as complete: {response.status}")
    elif kind == "fault: client aborts download":
        await abort_download(client.port, i)
    elif kind == "fault: client aborts upload":
        await abort_upload(client.port, i)
    else:
        raise ValueError(kind)


async def abort_download(port: int, i: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head("GET", f"/abort/{i}", f"x-req-id: soak-{i}",
                          f"x-upstream: download size={8 * MiB}"))
        got = b""
        while len(got) < 64 * KiB:
            data = await reader.read(65536)
            if not data:
                raise Incomplete("closed before the client could abort")
            got += data
        assert got.startswith(b"HTTP/1.1 200"), got[:40]
    finally:
        writer.transport.abort()  # RST in the middle of the download


async def abort_upload(port: int, i: int) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head("POST", f"/abort-up/{i}", f"x-req-id: soak-{i}",
                          f"Content-Length: {MiB}"))
        writer.write(PATTERN[:128 * KiB])
        await writer.drain()
        await asyncio.sleep(0.005)
    finally:
        writer.transport.abort()


@dataclass
class Tally:
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: list[str] = field(default_factory=list)
    done: int = 0


def plan(total: int, seed: int) -> list[str]:
    kinds = [k for k, _ in MIX]
    weights = [w for _, w in MIX]
    return random.Random(seed).choices(kinds, weights, k=total)


async def drive(port: int, kinds: list[str], concurrency: int, seed: int, tally: Tally) -> None:
    order = iter(range(len(kinds)))

    async def worker(n: int) -> None:
        client = Client(port)
        rng = random.Random(seed * 1000 + n)
        for i in order:
            kind = kinds[i]
            try:
                await run_one(client, kind, i, rng)
            except (AssertionError, Incomplete, OSError, asyncio.IncompleteReadError,
                    asyncio.LimitOverrunError, ValueError, KeyError) as exc:
                client.drop()
                tally.errors.append(f"#{i} {kind}: {type(exc).__name__}: {exc}"[:300])
            tally.counts[kind] += 1
            tally.done += 1
        await client.close()

    await asyncio.gather(*(worker(n) for n in range(concurrency)))


def settle() -> None:
    """Let the servers notice closed client connections before measuring."""
    time.sleep(2.0)


@dataclass
class Snapshot:
    rss: float
    fds: int
    upstream_conns: int

    @property
    def other_fds(self) -> int:
        # Each pooled upstream connection is one socket in the proxy; the rest
        # (listeners, pipes, logs, epoll) must not grow.
        return self.fds - self.upstream_conns


def snapshot(pid: int, upstream: UpstreamProcess) -> Snapshot:
    return Snapshot(rss_mb(pid), open_fds(pid), upstream.open_connections())


def soak_face(face: str, upstream: UpstreamProcess, total: int, concurrency: int,
              seed: int, warm_total: int | None) -> bool:
    port = free_port()
    log = Path(f"/tmp/dualproxy-soak-{face}.log")
    before = upstream.open_connections()
    proc = start_proxy(face, upstream.url, port, log)
    try:
        # Warm-up: a burst above the measured concurrency touches every worker
        # thread and fills the pool; then rounds of the same mix until the RSS
        # stops moving (caches, arenas and pools reach their working size).
        warm = Tally()
        if warm_total is None:
            warm_total = max(2000, total // 20)
        asyncio.run(drive(port, plan(warm_total, seed + 1), 2 * concurrency, seed + 1, warm))
        settle()
        base = snapshot(proc.pid, upstream)
        for round_ in range(2, 8):
            asyncio.run(drive(port, plan(warm_total, seed + round_), concurrency,
                              seed + round_, warm))
            settle()
            previous, base = base, snapshot(proc.pid, upstream)
            if abs(base.rss - previous.rss) < 0.02 * previous.rss:
                break
        tally = Tally()
        curve: list[float] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(1.0):
                curve.append(rss_mb(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.monotonic()
        asyncio.run(drive(port, plan(total, seed), concurrency, seed, tally))
        elapsed = time.monotonic() - started
        stop.set()
        sampler.join()
        settle()
        end = snapshot(proc.pid, upstream)
        alive = proc.poll() is None
    finally:
        stop_proxy(proc)
    deadline = time.monotonic() + 10
    while (after := upstream.open_connections()) > before and time.monotonic() < deadline:
        time.sleep(0.1)
    # With no request in flight every upstream connection left open is an idle
    # pooled one: never more than the requests ever in flight at once.
    pool_bound = 2 * concurrency
    crashes = log.read_text(errors="replace").count("Traceback")
    drift = (end.rss - base.rss) / base.rss * 100
    faults = sum(v for k, v in tally.counts.items() if k.startswith("fault:"))
    step = max(1, len(curve) // 10)
    checks = {
        "no unexpected errors": not tally.errors and not warm.errors,
        f"RSS drift < {RSS_DRIFT_LIMIT:.0f}%": drift < RSS_DRIFT_LIMIT,
        "fds back to baseline": end.other_fds <= base.other_fds,
        f"upstream connections at the end all idle in the pool (<= {pool_bound})":
            end.upstream_conns <= pool_bound,
        "upstream connections back to baseline once the proxy stopped": after <= before,
        "no tracebacks in the proxy log": crashes == 0,
        "proxy alive": alive,
    }
    print(f"\n== {face}: {total} requests ({faults} injected faults) in {elapsed:.0f} s "
          f"({total / elapsed:,.0f} req/s), {concurrency} clients; "
          f"warm-up {sum(warm.counts.values())}")
    for kind, _ in MIX:
        print(f"   {kind:32} {tally.counts[kind]:>7}")
    print(f"   unexpected errors                {len(tally.errors):>7}"
          f"   (warm-up: {len(warm.errors)})")
    for line in (warm.errors + tally.errors)[:10]:
        print(f"     {line}")
    print(f"   RSS  {base.rss:.1f} MB after warm-up -> {end.rss:.1f} MB at the end "
          f"({drift:+.1f}%); during the run: "
          + " ".join(f"{v:.0f}" for v in curve[::step]) + " MB")
    print(f"   fds  {base.fds} -> {end.fds} (pooled upstream sockets {base.upstream_conns} -> "
          f"{end.upstream_conns}; others {base.other_fds} -> {end.other_fds})")
    print(f"   upstream open connections: {before} before the proxy, {base.upstream_conns} "
          f"after warm-up, {end.upstream_conns} at the end, {after} once it stopped")
    print(f"   tracebacks in the proxy log: {crashes} ({log})")
    for name, ok in checks.items():
        print(f"   [{'ok' if ok else 'FAIL'}] {name}")
    passed = all(checks.values())
    print(f"   {'PASS' if passed else 'FAIL'}")
    return passed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000,
                        help="total requests, split between the faces (default 100000)")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="concurrent client connections (default 16)")
    parser.add_argument("--face", action="append", choices=sorted(FACES | CROSS),
                        help="soak this pairing (repeatable; default asgi-uvicorn and "
                             "wsgi-gunicorn)")
    parser.add_argument("--warmup", type=int, default=None, metavar="N",
                        help="warm-up requests per round (default max(2000, requests/20))")
    parser.add_argument("--seed", type=int, default=1)
    opts = parser.parse_args()
    faces = opts.face or list(FACES)
    upstream = UpstreamProcess()
    started = time.monotonic()
    try:
        results = [soak_face(face, upstream, opts.requests // len(faces), opts.concurrency,
                             opts.seed, opts.warmup) for face in faces]
    finally:
        upstream.stop()
    print(f"\nsoak {'PASS' if all(results) else 'FAIL'} in {time.monotonic() - started:.0f} s")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
