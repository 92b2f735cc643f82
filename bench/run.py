"""Side-by-side benchmark: dualproxy and the usual alternatives, one run, one machine.

    python bench/run.py [--quick] [--only NAME ...] [--out bench/results]

Starts a fast upstream (nginx if installed, else a static ASGI app on uvicorn),
then each contestant as one proxy process in front of it, one after another:
small-GET throughput and latency (wrk, or a built-in load generator), 100 MiB
download and upload speed (curl, or httpx), a chunked upload, and the peak RSS
of the proxy's process tree. For dualproxy also the RSS while streaming 1 GiB
each way, and 2 workers against 1. Prints a table, the ratios the project's
targets are stated in, and writes JSON and a bar chart. Not part of CI: the
figures drift on a shared machine; compare only within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
MiB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout: float = 30.0) -> bool:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return False


def start(args: list[str], env: dict[str, str] | None = None,
          log: Path | None = None) -> subprocess.Popen[bytes]:
    out = log.open("wb") if log else subprocess.DEVNULL
    return subprocess.Popen(args, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


# -- the upstream -----------------------------------------------------------------------


def make_files(directory: Path, big: int) -> None:
    block = os.urandom(MiB)
    (directory / "small").write_bytes(b"ok")
    (directory / "16k").write_bytes(block[:16384])
    for name, size in (("big", big), ("big1g", 1024 * MiB)):
        path = directory / name
        if not path.exists() or path.stat().st_size != size:
            with path.open("wb") as fh:
                for _ in range(size // MiB):
                    fh.write(block)


NGINX_CONF = """
user root;
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  server {{
    listen 127.0.0.1:{port};
    root {dir}/www;
    client_max_body_size 0;
    keepalive_requests 1000000;
    location = /sink {{ return 200 "ok"; }}
  }}
}}
"""


class Upstream:
    def __init__(self, workdir: Path, big: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        www = workdir / "www"
        www.mkdir(parents=True, exist_ok=True)
        make_files(www, big)
        nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists()
                                          else None)
        if nginx:
            conf = workdir / "nginx.conf"
            conf.write_text(NGINX_CONF.format(dir=workdir, port=self.port))
            self.kind = "nginx"
            self.proc = start([nginx, "-c", str(conf)], log=workdir / "nginx.out")
        else:
            self.kind = "uvicorn static app"
            self.proc = start([PY, "-m", "uvicorn", "bench.static_upstream:app", "--port",
                               str(self.port), "--log-level", "warning", "--no-access-log"],
                              env={"BENCH_WWW": str(www)}, log=workdir / "upstream.out")
        if not wait_http(self.url + "/small"):
            raise RuntimeError(f"upstream ({self.kind}) did not start")

    def stop(self) -> None:
        stop(self.proc)


# -- measurements ------------------------------------------------------------------------


def tree_pids(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_rss_mb(root: int) -> float:
    total = 0
    for pid in tree_pids(root):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


class RssSampler:
    """Samples the RSS of a process tree every 50 ms; `peak` is the highest seen."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_mb(self.root))
            time.sleep(0.05)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    match = re.match(r"([\d.]+)(us|ms|s)", text)
    return float(match.group(1)) * _UNITS[match.group(2)] if match else float("nan")


def load_small(url: str, seconds: int) -> dict[str, float]:
    """Small GETs at 32 connections: req/s, p50, p99 (ms)."""
    if shutil.which("wrk"):
        out = subprocess.run(["wrk", "-t1", "-c32", f"-d{seconds}s", "--latency", url],
                             capture_output=True, text=True, timeout=seconds + 30).stdout
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
        # Anchored: the thread-stats line also ends in a percentage.
        p50 = _ms(re.search(r"^\s*50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
        p99 = _ms(re.search(r"^\s*99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
        bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        errors = int(bad.group(1)) if bad else 0
        return {"rps": rps, "p50_ms": p50, "p99_ms": p99, "errors": errors}
    from bench.loadgen import run_load

    return run_load(url, connections=32, seconds=seconds)


def curl_speed(args: list[str], kind: str) -> tuple[float, bool]:
    """MB/s (10^6 bytes) of one curl transfer, and whether it answered 200."""
    fmt = "%{speed_" + kind + "} %{http_code}"
    if shutil.which("curl"):
        out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", fmt, *args],
                             capture_output=True, text=True, timeout=600).stdout.split()
        return float(out[0]) / 1e6, out[1] == "200"
    return _httpx_speed(args, kind)


def _httpx_speed(args: list[str], kind: str) -> tuple[float, bool]:
    import httpx

    url = args[-1]
    started = time.perf_counter()
    if kind == "download":
        size = 0
        with httpx.stream("GET", url, timeout=600) as response:
            for chunk in response.iter_raw():
                size += len(chunk)
            ok = response.status_code == 200
    else:
        path = Path(args[args.index("--data-binary") + 1].lstrip("@")) if "--data-binary" in args \
            else Path(args[args.index("-T") + 1])
        size = path.stat().st_size

        def chunks() -> Any:
            with path.open("rb") as fh:
                while block := fh.read(MiB):
                    yield block

        ok = httpx.post(url, content=chunks(), timeout=600).status_code == 200
    return size / (time.perf_counter() - started) / 1e6, ok


# -- contestants ---------------------------------------------------------------------------


@dataclass
class Contestant:
    name: str
    face: str
    args: list[str]
    dualproxy: bool = False
    workers: int = 1


def contestants(upstream: str, port: int) -> list[Contestant]:
    bind = f"127.0.0.1:{port}"
    dp = [PY, "-m", "dualproxy", "serve", "--upstream", upstream, "--bind", bind,
          "--no-access-log", "--log-level", "warning"]
    gunicorn = [PY, "-m", "gunicorn", "-w", "1", "-k", "gthread", "--threads", "32",
                "-b", bind, "--log-level", "warning"]
    uvicorn = [PY, "-m", "uvicorn", "--port", str(port), "--no-access-log",
               "--log-level", "warning"]
    return [
        Contestant("dualproxy asgi (uvicorn)", "asgi", dp, dualproxy=True),
        Contestant("dualproxy wsgi (gunicorn)", "wsgi", [*dp, "--adapter", "wsgi"],
                   dualproxy=True),
        Contestant("seed pattern (FastAPI+httpx)", "asgi",
                   [*uvicorn, "bench.contestants.seed_asgi:app"]),
        Contestant("fastapi-proxy-lib", "asgi",
                   [*uvicorn, "bench.contestants.fastapi_proxy_lib_app:app"]),
        Contestant("seed sync twin (Flask+httpx)", "wsgi",
                   [*gunicorn, "bench.contestants.seed_wsgi:app"]),
        Contestant("werkzeug ProxyMiddleware", "wsgi",
                   [*gunicorn, "bench.contestants.werkzeug_proxy:app"]),
        Contestant("dualproxy asgi, 2 workers", "asgi", [*dp, "--workers", "2"],
                   dualproxy=True, workers=2),
        Contestant("dualproxy wsgi, 2 workers", "wsgi",
                   [*dp, "--adapter", "wsgi", "--workers", "2"], dualproxy=True, workers=2),
    ]


@dataclass
class Result:
    name: str
    face: str
    workers: int
    status: str = "ok"
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    errors: int = 0
    down_mbs: float = 0.0
    up_mbs: float = 0.0
    chunked_up: str = "-"
    idle_rss_mb: float = 0.0
    peak_rss_mb: float = 0.0
    gib_peak_over_idle_mb: float | None = None
    small_peak_over_idle_mb: float | None = None
    notes: list[str] = field(default_factory=list)


def run_contestant(c: Contestant, upstream: Upstream, work: Path, opts: argparse.Namespace,
                   port: int) -> Result:
    result = Result(c.name, c.face, c.workers)
    env = {"BENCH_UPSTREAM": upstream.url}
    proc = start(c.args, env=env, log=work / f"{re.sub(r'[^a-z0-9]+', '-', c.name.lower())}.log")
    base = f"http://127.0.0.1:{port}"
    try:
        if not wait_http(base + "/small"):
            result.status = "failed to start"
            return result
        subprocess.run(["curl", "-s", "-o", "/dev/null", base + "/small"], timeout=10)
        load_small(base + "/small", 1)  # warm-up
        small = load_small(base + "/small", opts.seconds)
        result.rps, result.p50_ms, result.p99_ms = small["rps"], small["p50_ms"], small["p99_ms"]
        result.errors = int(small["errors"])
        if c.workers > 1:
            return result
        result.idle_rss_mb = tree_rss_mb(proc.pid)
        big_file = upstream_file(work, "big")
        with RssSampler(proc.pid) as rss:
            result.down_mbs, ok_down = curl_speed([base + "/big"], "download")
            result.up_mbs, ok_up = curl_speed(["--data-binary", f"@{big_file}", base + "/sink"],
                                              "upload")
            _, ok_chunked = curl_speed(["-T", str(big_file), "-H",
                                        "Transfer-Encoding: chunked", base + "/sink"], "upload")
        result.peak_rss_mb = rss.peak
        result.chunked_up = "ok" if ok_chunked else "FAILED"
        if not (ok_down and ok_up):
            result.notes.append("a 100 MiB transfer did not answer 200")
        if c.dualproxy and not opts.quick:
            result.small_peak_over_idle_mb = rss.peak - result.idle_rss_mb
            with RssSampler(proc.pid) as rss_gib:
                curl_speed([base + "/big1g"], "download")
                curl_speed(["-T", str(upstream_file(work, "big1g")), "-H",
                            "Transfer-Encoding: chunked", base + "/sink"], "upload")
            result.gib_peak_over_idle_mb = rss_gib.peak - result.idle_rss_mb
    except Exception as exc:  # a broken contestant is a row, not a crash
        result.status = f"failed: {type(exc).__name__}: {exc}"[:120]
    finally:
        stop(proc)
    return result


def upstream_file(work: Path, name: str) -> Path:
    return work / "www" / name


# -- report ----------------------------------------------------------------------------------


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def report(results: list[Result], upstream_kind: str) -> tuple[str, list[tuple[str, bool]]]:
    by = {r.name: r for r in results}
    lines = [f"upstream: {upstream_kind}; small GETs: wrk -t1 -c32; 100 MiB transfers: curl",
             "",
             "| contestant | small GET req/s | p50 ms | p99 ms | 100 MiB down MB/s | "
             "up MB/s | chunked up | idle RSS MB | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.status != "ok":
            lines.append(f"| {r.name} | {r.status} | | | | | | | |")
            continue
        if r.workers > 1:
            lines.append(f"| {r.name} | {r.rps:,.0f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} "
                         "| | | | | |")
            continue
        lines.append(f"| {r.name} | {r.rps:,.0f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | "
                     f"{r.down_mbs:,.0f} | {r.up_mbs:,.0f} | {r.chunked_up} | "
                     f"{r.idle_rss_mb:.0f} | {r.peak_rss_mb:.0f} |")
    checks: list[tuple[str, bool]] = []

    def get(name: str) -> Result | None:
        r = by.get(name)
        return r if r is not None and r.status == "ok" else None

    asgi, wsgi = get("dualproxy asgi (uvicorn)"), get("dualproxy wsgi (gunicorn)")
    seed, twin = get("seed pattern (FastAPI+httpx)"), get("seed sync twin (Flask+httpx)")
    fpl, wz = get("fastapi-proxy-lib"), get("werkzeug ProxyMiddleware")
    lines.append("")
    if asgi and seed:
        best = max((p for p in (seed, fpl) if p), key=lambda p: p.rps)
        lines.append(f"asgi: {ratio(asgi.rps, seed.rps):.1f}x the seed pattern's req/s, "
                     f"{ratio(asgi.rps, best.rps):.1f}x the best async peer ({best.name}); "
                     f"p99 {asgi.p99_ms:.1f} ms")
        checks.append(("asgi >= 10x seed req/s", asgi.rps >= 10 * seed.rps))
        checks.append(("asgi p99 <= 25 ms", asgi.p99_ms <= 25))
        for face in (asgi, wsgi):
            if face:
                checks.append((f"{face.face} 100 MiB down >= 2x seed",
                               face.down_mbs >= 2 * seed.down_mbs))
                checks.append((f"{face.face} 100 MiB up >= 2x seed",
                               face.up_mbs >= 2 * seed.up_mbs))
                lines.append(f"{face.face}: download {ratio(face.down_mbs, seed.down_mbs):.1f}x, "
                             f"upload {ratio(face.up_mbs, seed.up_mbs):.1f}x the seed pattern's")
    if wsgi and twin:
        checks.append(("wsgi >= 2x sync twin req/s", wsgi.rps >= 2 * twin.rps))
        line = f"wsgi: {ratio(wsgi.rps, twin.rps):.1f}x the sync twin's req/s"
        if wz:
            checks.append(("wsgi >= 1.2x werkzeug req/s", wsgi.rps >= 1.2 * wz.rps))
            line += f", {ratio(wsgi.rps, wz.rps):.1f}x werkzeug ProxyMiddleware's"
        lines.append(line)
    for face in (asgi, wsgi):
        if face and face.gib_peak_over_idle_mb is not None:
            lines.append(f"{face.face}: RSS over idle while streaming 100 MiB "
                         f"{face.small_peak_over_idle_mb:.1f} MB, 1 GiB each way "
                         f"{face.gib_peak_over_idle_mb:.1f} MB")
            checks.append((f"{face.face} 1 GiB streaming RSS within 32 MB of idle",
                           face.gib_peak_over_idle_mb <= 32))
    for one, two in ((asgi, get("dualproxy asgi, 2 workers")),
                     (wsgi, get("dualproxy wsgi, 2 workers"))):
        if one and two:
            lines.append(f"{one.face}: 2 workers give {ratio(two.rps, one.rps):.2f}x one worker")
            checks.append((f"{one.face} 2 workers >= 1.6x one", two.rps >= 1.6 * one.rps))
    lines.append("")
    lines += [f"{'PASS' if ok else 'FAIL'}  {name}" for name, ok in checks]
    return "\n".join(lines), checks


def chart(results: list[Result], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart")
        return
    rows = [r for r in results if r.status == "ok"]
    names = [r.name for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.5))
    for ax, key, title in ((axes[0], "rps", "small GET req/s (32 conns)"),
                           (axes[1], "down_mbs", "100 MiB download MB/s"),
                           (axes[2], "up_mbs", "100 MiB upload MB/s")):
        values = [getattr(r, key) for r in rows]
        colors = ["#2a7ab9" if r.name.startswith("dualproxy") else "#aaaaaa" for r in rows]
        ax.barh(names, values, color=colors)
        ax.set_title(title)
        ax.invert_yaxis()
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:,.0f}", va="center", fontsize=8)
    for ax in axes[1:]:
        ax.set_yticklabels([])
    fig.suptitle("dualproxy vs. the usual alternatives (one run, shared 2-core machine)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="3 s loads and 16 MiB transfers, no 1 GiB check")
    parser.add_argument("--only", action="append", default=[],
                        help="run contestants whose name contains this (repeatable)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--seconds", type=int, default=None)
    opts = parser.parse_args()
    opts.seconds = opts.seconds or (3 if opts.quick else 8)
    big = 16 * MiB if opts.quick else 100 * MiB
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="dualproxy-bench-"))
    print(f"work dir {work}", flush=True)
    upstream = Upstream(work, big)
    results: list[Result] = []
    try:
        port = free_port()
        for c in contestants(upstream.url, port):
            if opts.only and not any(o.lower() in c.name.lower() for o in opts.only):
                continue
            print(f"-- {c.name}", flush=True)
            result = run_contestant(c, upstream, work, opts, port)
            print(f"   {result.status}: {result.rps:,.0f} req/s p99 {result.p99_ms:.1f} ms, "
                  f"down {result.down_mbs:,.0f} MB/s, up {result.up_mbs:,.0f} MB/s, "
                  f"peak RSS {result.peak_rss_mb:.0f} MB", flush=True)
            results.append(result)
    finally:
        upstream.stop()
    text, checks = report(results, upstream.kind)
    print()
    print(text)
    doc = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "upstream": upstream.kind,
           "quick": opts.quick, "results": [asdict(r) for r in results],
           "checks": [{"target": n, "met": ok} for n, ok in checks], "report": text}
    (out / "latest.json").write_text(json.dumps(doc, indent=2))
    chart(results, out / "latest.png")
    print(f"\nwrote {out / 'latest.json'} and {out / 'latest.png'}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
