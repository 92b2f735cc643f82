"""The WebSocket rows of the bench: an echo upstream, a small load generator, the rows.

    python -m bench.wsbench echo --port P        # the echo upstream alone
    python -m bench.wsbench load ws://HOST:P/    # both measurements against one URL

The upstream is the `websockets` library's own asyncio server echoing every message
(not ours, so the proxies are measured against a common reference). The load generator
is an asyncio client on the same library, bounded in sockets, messages and time:
32 sockets each sending a small text message and waiting for its echo, back to back,
for N seconds (messages/s and round-trip p50/p99), then one socket echoing 1 MiB binary
messages with up to 4 in flight (MB/s of payload one way; every byte crosses the proxy
twice). Every contestant runs at once and is measured in turn, three rounds over: the
medians are reported. Compression is off on the client so neither side measures zlib. Both sides run
on uvloop when it is installed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

MiB = 1024 * 1024
SOCKETS = 32
SMALL = 32  # bytes of each small message
RECV_TIMEOUT = 10.0  # seconds for one echo before the socket counts as broken
ROUNDS = 3  # every contestant is measured once per round; the medians are reported


async def echo_server(port: int) -> None:
    from websockets.asyncio.server import ServerConnection, serve

    async def echo(ws: ServerConnection) -> None:
        async for message in ws:
            await ws.send(message)

    async with serve(echo, "127.0.0.1", port, max_size=None, compression=None):
        await asyncio.Event().wait()


async def small_messages(url: str, seconds: float, sockets: int = SOCKETS) -> dict[str, float]:
    """Echo round trips of small text messages on `sockets` sockets for `seconds`."""
    from websockets.asyncio.client import connect

    rtts: list[float] = []
    errors = 0

    async def one(n: int, deadline: float) -> None:
        nonlocal errors
        try:
            async with connect(url, compression=None, max_size=None, open_timeout=10,
                               close_timeout=2) as ws:
                payload = f"{n:04d}".ljust(SMALL, "x")
                while time.perf_counter() < deadline:
                    started = time.perf_counter()
                    await ws.send(payload)
                    echo = await asyncio.wait_for(ws.recv(), RECV_TIMEOUT)
                    rtts.append(time.perf_counter() - started)
                    if echo != payload:
                        errors += 1
        except Exception:
            errors += 1

    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(*(one(n, deadline) for n in range(sockets)))
    elapsed = time.perf_counter() - started
    rtts.sort()

    def pct(p: float) -> float:
        return rtts[min(len(rtts) - 1, int(len(rtts) * p))] * 1e3 if rtts else math.nan

    return {"msgs_per_s": len(rtts) / elapsed, "p50_ms": pct(0.50), "p99_ms": pct(0.99),
            "errors": float(errors)}


async def big_messages(url: str, count: int, size: int = MiB, window: int = 4) -> dict[str, float]:
    """`count` binary messages of `size` bytes echoed on one socket, `window` in flight."""
    from websockets.asyncio.client import connect

    payload = os.urandom(size)
    async with connect(url, compression=None, max_size=None, open_timeout=10,
                       close_timeout=2) as ws:
        credit = asyncio.Semaphore(window)

        async def sender() -> None:
            for _ in range(count):
                await credit.acquire()
                await ws.send(payload)

        started = time.perf_counter()
        task = asyncio.ensure_future(sender())
        bad = 0
        try:
            for _ in range(count):
                echo = await asyncio.wait_for(ws.recv(), RECV_TIMEOUT * 3)
                bad += echo != payload
                credit.release()
        finally:
            task.cancel()
        elapsed = time.perf_counter() - started
    return {"mbs": count * size / elapsed / 1e6, "errors": float(bad)}


# -- the rows ------------------------------------------------------------------------------


@dataclass
class WsResult:
    key: str
    name: str
    status: str = "ok"
    msgs_per_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    errors: int | None = None
    big_mbs: float | None = None
    failures: dict[str, str] = field(default_factory=dict)


# nginx as a WebSocket proxy (one worker, as nginx's HTTP rows): the yardstick for what a
# third process in the path costs on this machine.
NGINX_WS_CONF = """
{user}
worker_processes 1;
daemon off;
pid {dir}/nginx-ws.pid;
error_log {dir}/nginx-ws.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir};
  uwsgi_temp_path {dir}; scgi_temp_path {dir};
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://127.0.0.1:{echo_port};
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection "upgrade";
      proxy_read_timeout 1h;
    }}
  }}
}}
"""


def ws_contestants(echo_port: int, nginx: str | None = None
                   ) -> list[tuple[str, str, Callable[[int], list[str]]]]:
    """(key, name, port -> command line); the direct row has no command."""
    import sys
    import tempfile

    upstream = f"http://127.0.0.1:{echo_port}"

    def dp(*extra: str) -> Callable[[int], list[str]]:
        return lambda port: [sys.executable, "-m", "dualproxy", "serve", "--upstream", upstream,
                             "--bind", f"127.0.0.1:{port}", "--no-access-log",
                             "--log-level", "warning", *extra]

    def fpl(port: int) -> list[str]:
        # The server settings `dualproxy serve` gives uvicorn: only the app differs.
        return [sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port),
                "--loop", "uvloop", "--http", "httptools", "--ws", "websockets-sansio",
                "--ws-max-size", str(16 * MiB), "--no-access-log", "--log-level", "warning",
                "bench.contestants.fastapi_proxy_lib_ws_app:app"]

    def nginx_ws(port: int) -> list[str]:
        assert nginx is not None
        workdir = tempfile.mkdtemp(prefix="dualproxy-bench-nginx-ws-")
        conf = os.path.join(workdir, "nginx.conf")
        with open(conf, "w") as fh:
            fh.write(NGINX_WS_CONF.format(dir=workdir, port=port, echo_port=echo_port,
                                          user="user root;" if os.geteuid() == 0 else ""))
        return [nginx, "-c", conf]

    return [
        ("direct", "no proxy (straight to the echo upstream)", lambda port: []),
        *([("nginx", "nginx proxy_pass (1 worker)", nginx_ws)] if nginx else []),
        ("dp-asgi", "dualproxy asgi (uvicorn)", dp()),
        # One thread per open socket on the WSGI face: 32 sockets need more than 32 threads.
        ("dp-wsgi", "dualproxy wsgi (gunicorn gthread, 48 threads)",
         dp("--adapter", "wsgi", "--threads", "48")),
        ("fpl", "fastapi-proxy-lib 0.3.0 reverse_ws_app", fpl),
    ]


def run_rows(chosen: Callable[[str], bool], seconds: float, quick: bool,
             start: Callable[..., Any], stop: Callable[[Any], None],
             free_port: Callable[[], int], wait_port: Callable[[int, Any], bool],
             nginx: str | None = None, rounds: int = ROUNDS) -> list[WsResult]:
    """Start the echo upstream and every chosen contestant in front of it, then measure
    them in turn, `rounds` times over (interleaved, so a change in the machine's load
    reaches every row alike), and keep each figure's median."""
    import sys

    echo_port = free_port()
    procs = [start([sys.executable, "-m", "bench.wsbench", "echo", "--port", str(echo_port)])]
    results: list[tuple[WsResult, str]] = []
    try:
        if not wait_port(echo_port, procs[0]):
            raise RuntimeError("the WebSocket echo upstream did not start")
        for key, name, args in ws_contestants(echo_port, nginx):
            if not chosen(key):
                continue
            result, port = WsResult(key, name), echo_port
            if key != "direct":
                port = free_port()
                procs.append(start(args(port),
                                   env={"BENCH_WS_UPSTREAM": f"ws://127.0.0.1:{echo_port}"}))
                if not wait_port(port, procs[-1]):
                    result.status = "did not start"
            results.append((result, f"ws://127.0.0.1:{port}/"))
        samples: dict[str, list[dict[str, float]]] = {r.key: [] for r, _ in results}
        for n in range(rounds):
            for result, url in results:
                if result.status == "ok":
                    print(f"-- WebSocket, round {n + 1} of {rounds}: {result.name}", flush=True)
                    samples[result.key].append(measure(result, url, seconds, quick))
        for result, _ in results:
            summarize(result, samples[result.key])
            print(f"   {result.name}: {fmt(result.msgs_per_s)} msg/s, p99 "
                  f"{fmt(result.p99_ms, '.1f')} ms, 1 MiB messages {fmt(result.big_mbs)} MB/s "
                  f"(medians of {len(samples[result.key])})", flush=True)
            for step, why in result.failures.items():
                print(f"   ! {step}: {why}", flush=True)
    finally:
        for proc in procs:
            stop(proc)
    return [r for r, _ in results]


def run_async(coro: Any) -> Any:
    """Run on uvloop when installed (the client must not be the bottleneck), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def measure(result: WsResult, url: str, seconds: float, quick: bool) -> dict[str, float]:
    """One round of both loads against url; a failed step is recorded on the result."""
    sample: dict[str, float] = {"errors": 0.0}
    try:
        sample.update(run_async(asyncio.wait_for(small_messages(url, seconds), seconds + 60)))
    except Exception as exc:
        result.failures["small messages"] = f"{type(exc).__name__}: {exc}"[:200]
    try:
        big = run_async(asyncio.wait_for(big_messages(url, 16 if quick else 64), 120))
        sample["big_mbs"] = big["mbs"]
        sample["errors"] += big["errors"]
    except Exception as exc:
        result.failures["1 MiB messages"] = f"{type(exc).__name__}: {exc}"[:200]
    return sample


def summarize(result: WsResult, samples: list[dict[str, float]]) -> None:
    """Each figure's median over the rounds; errors summed."""
    for attr in ("msgs_per_s", "p50_ms", "p99_ms", "big_mbs"):
        values = sorted(s[attr] for s in samples if attr in s)
        if values:
            setattr(result, attr, values[len(values) // 2])
    if samples:
        result.errors = int(sum(s["errors"] for s in samples))


def fmt(value: float | None, spec: str = ",.0f") -> str:
    return "—" if value is None or math.isnan(value) else format(value, spec)


def table(results: list[WsResult], seconds: float) -> list[str]:
    lines = [f"WebSocket: {SOCKETS} sockets echoing {SMALL}-byte text messages back to back for "
             f"{seconds:g} s; 1 MiB binary messages on one socket, 4 in flight; medians of "
             f"{ROUNDS} interleaved rounds",
             "", "| contestant | msg/s | p50 ms | p99 ms | 1 MiB msgs MB/s | errors |",
             "|---|---|---|---|---|---|"]
    for r in results:
        name = f"**{r.name}**" if r.key.startswith("dp-") else r.name
        if r.status != "ok":
            lines.append(f"| {name} | {r.status} | | | | |")
            continue
        small = "small messages" in r.failures
        lines.append(f"| {name} | {'failed' if small else fmt(r.msgs_per_s)} "
                     f"| {fmt(r.p50_ms, '.1f')} | {fmt(r.p99_ms, '.1f')} "
                     f"| {'failed' if '1 MiB messages' in r.failures else fmt(r.big_mbs)} "
                     f"| {fmt(None if r.errors is None else float(r.errors))} |")
    return lines


def targets(results: list[WsResult]) -> list[tuple[str, str]]:
    """(target, PASS/FAIL/n/a: why) for the WebSocket rows."""
    by = {r.key: r for r in results if r.status == "ok"}

    def get(key: str, attr: str) -> float | None:
        r = by.get(key)
        v = getattr(r, attr) if r is not None and not r.errors else None
        return None if v is None or math.isnan(v) else float(v)

    out = []
    for name, a, b, factor in (
            ("asgi WS >= 1.5x fastapi-proxy-lib msg/s", get("dp-asgi", "msgs_per_s"),
             get("fpl", "msgs_per_s"), 1.5),
            ("wsgi WS tunnel >= 0.8x direct msg/s", get("dp-wsgi", "msgs_per_s"),
             get("direct", "msgs_per_s"), 0.8),
            ("wsgi WS tunnel >= 0.8x direct 1 MiB MB/s", get("dp-wsgi", "big_mbs"),
             get("direct", "big_mbs"), 0.8)):
        if a is None or b is None:
            out.append((name, "n/a (a figure is missing or had errors)"))
        else:
            out.append((name, f"{'PASS' if a >= factor * b else 'FAIL'} "
                              f"({a:,.1f} vs {factor:g} × {b:,.1f})"))
    for attr, label in (("msgs_per_s", "msg/s"), ("big_mbs", "1 MiB MB/s")):
        a, b = get("dp-wsgi", attr), get("nginx", attr)
        if a is not None and b is not None:  # what a third process costs here, for scale
            out.append((f"wsgi WS tunnel / nginx proxy_pass {label}", f"info ({a / b:.2f}×)"))
    return out


def as_json(results: list[WsResult]) -> list[dict[str, Any]]:
    return [asdict(r) for r in results]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    echo = sub.add_parser("echo", help="run the echo upstream")
    echo.add_argument("--port", type=int, required=True)
    load = sub.add_parser("load", help="measure one URL")
    load.add_argument("url")
    load.add_argument("--seconds", type=float, default=5)
    load.add_argument("--quick", action="store_true")
    opts = parser.parse_args()
    if opts.command == "echo":
        try:
            run_async(echo_server(opts.port))
        except KeyboardInterrupt:
            pass
        return 0
    result = WsResult("url", opts.url)
    summarize(result, [measure(result, opts.url, opts.seconds, opts.quick)])
    print(json.dumps(asdict(result), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
