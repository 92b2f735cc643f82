"""Side-by-side benchmark: dualproxy and the usual alternatives, one run, one machine.

    python bench/run.py [--quick] [--only NAME ...] [--out bench/results]
                        [--baseline-tree /path/to/other/checkout]

Starts a fast upstream (nginx if installed, else a static ASGI app on uvicorn),
then each contestant as one proxy process in front of it, one after another:
small-GET throughput and latency (wrk, or bench/loadgen.py), 100 MiB download
and upload speed (curl, or httpx; median of 3), a chunked upload, checked to
arrive whole at the upstream, the idle RSS and the peak RSS of the proxy's
process tree. For dualproxy also the RSS while streaming 1 GiB each way, 2 workers
against 1, a pool of 2 upstreams (nginx on a second port) against 1 on small GETs,
and small GETs with the access log on against off (`dp-asgi-log`, `dp-wsgi-log`), and
with request ids and header rules on against off (`dp-asgi-hdr`, `dp-wsgi-hdr`;
tracing the same way, spans made but not exported: `dp-asgi-trace`, `dp-wsgi-trace`
(and sent by the OTLP exporter to nginx: `dp-asgi-otlp`, `dp-wsgi-otlp`);
a `--sub-filter` over the 64 KiB JSON document: `dp-asgi-sub`, `dp-wsgi-sub`; a mount
sending X-Forwarded-Prefix against one that does not: `dp-asgi-xfp`, `dp-wsgi-xfp`;
every other dualproxy row runs with `--no-access-log`), and GETs of a 64 KiB JSON
document with `--compress` on against off (`dp-asgi-compress`, `dp-wsgi-compress`:
req/s, CPU per request, bytes per response; the client accepts zstd, br and gzip),
and `--cache` hits against the same proxy without cache (`dp-asgi-cache`,
`dp-wsgi-cache`, `dp-wsgi-granian-cache`: small GETs of a file nginx serves with Cache-Control, and the large
file's download rate, hit against uncached).
Then the WebSocket rows (bench/wsbench.py: messages/s and p99 over 32 sockets, MB/s
of 1 MiB messages; `--ws-only`, `--no-ws`).
Prints a table, every dualproxy figure as a ratio to the seed pattern and to the
best peer of the same face, PASS/FAIL for the project's targets, and writes JSON
and a bar chart. Not part of CI: the figures drift on a shared machine; compare
only within one run. That is why `--baseline-tree DIR` adds `dp-asgi-before` and
`dp-wsgi-before`: dualproxy from another checkout (say, main before a change), run
with that tree on PYTHONPATH in the same run, and a before/after table.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/run.py` puts bench/ first, not the root
    sys.path.insert(0, str(ROOT))
PY = sys.executable
MiB = 1024 * 1024
GiB = 1024 * MiB
TRANSFER_TIMEOUT = 300  # seconds per curl transfer
RSS_BUDGET_MB = 32

# -- processes ------------------------------------------------------------------------------

_LIVE: set[subprocess.Popen[bytes]] = set()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None) -> bool:
    """True once url answers below 500; False on timeout or if proc exits first."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return False


def start(args: list[str], env: dict[str, str] | None = None,
          log: Path | None = None, cwd: Path = ROOT) -> subprocess.Popen[bytes]:
    """Start args in a new process group (so stop() reaches every child)."""
    out: Any = log.open("wb") if log else subprocess.DEVNULL
    proc = subprocess.Popen(args, cwd=cwd, env={**os.environ, **(env or {})}, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)
    if log:
        out.close()
    _LIVE.add(proc)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, SIGKILL it after 10 s."""
    _LIVE.discard(proc)
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    try:  # stragglers of the group (a worker that outlived its master)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop_all() -> None:
    for proc in list(_LIVE):
        stop(proc)


def _on_signal(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# -- the upstream -----------------------------------------------------------------------------


def make_file(path: Path, size: int, block: bytes) -> None:
    """A file of `size` bytes made by repeating one random 1 MiB block (fast)."""
    if path.exists() and path.stat().st_size == size:
        return
    with path.open("wb") as fh:
        for _ in range(size // len(block)):
            fh.write(block)
        fh.write(block[: size % len(block)])


# The sink: with `return 200` nginx answers as soon as the head arrives and discards the
# body afterwards, so a proxy could answer the client before forwarding the upload. Through
# proxy_pass with request buffering on (the default) nginx reads the whole body first (into
# client_body_temp_path, on /dev/shm when there is one), then asks the inner server for the
# answer. X-Received-Length ($request_length: head + body as received) lets the bench check
# that the whole body arrived, chunked included.
NGINX_CONF = """
{user}
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {body_dir};
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  keepalive_requests 1000000;
  default_type application/octet-stream;
  types {{ application/json json; }}  # the compress rows' document
  upstream sink_answer {{ server 127.0.0.1:{inner_port}; keepalive 4; }}
  server {{
    listen 127.0.0.1:{port};
    listen 127.0.0.1:{port2};  # the second upstream of the pool rows (the same nginx)
    root {dir}/www;
    client_max_body_size 0;
    location /cached/ {{  # the cache rows: the same files, cacheable for an hour
      alias {dir}/www/;
      add_header Cache-Control "public, max-age=3600";
    }}
    location = /v1/traces {{ return 200; }}  # the OTLP rows' collector: takes, drops
    location = /sink {{
      client_body_buffer_size 1m;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      proxy_set_header Transfer-Encoding "";
      proxy_pass http://sink_answer/ok;
      add_header X-Received-Length $request_length always;
    }}
  }}
  server {{
    listen 127.0.0.1:{inner_port};
    location = /ok {{ return 200 "ok"; }}
  }}
}}
"""


class Upstream:
    """nginx (one worker) or the fallback static ASGI app, serving `www` and /sink."""

    def __init__(self, workdir: Path, sizes: dict[str, int]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # The pool rows' second upstream: nginx's second port; without nginx the same
        # static app by another name (a pool refuses one upstream given twice).
        self.port2 = free_port()
        self.url2 = f"http://127.0.0.1:{self.port2}"
        self.www = workdir / "www"
        self.www.mkdir(parents=True, exist_ok=True)
        block = os.urandom(MiB)
        for name, size in sizes.items():
            make_file(self.www / name, size, block)
        (self.www / DOCUMENT).write_bytes(json_document(DOCUMENT_SIZE))
        self.sizes = sizes
        self.body_dir: Path | None = None
        nginx = TOOLS.get("nginx")
        if nginx:
            self.kind = "nginx (1 worker)"
            shm = Path("/dev/shm")
            self.body_dir = Path(tempfile.mkdtemp(prefix="dualproxy-bench-body-",
                                                  dir=shm if shm.is_dir() else workdir))
            conf = workdir / "nginx.conf"
            conf.write_text(NGINX_CONF.format(
                dir=workdir, port=self.port, port2=self.port2, inner_port=free_port(),
                body_dir=self.body_dir,
                # as root nginx would run its worker as nobody, who cannot read the temp dir
                user="user root;" if os.geteuid() == 0 else ""))
            self.proc = start([nginx, "-c", str(conf)], log=workdir / "nginx.out")
        else:
            self.kind = "uvicorn static app (no nginx)"
            self.url2 = f"http://localhost:{self.port}"
            self.proc = start([PY, "-m", "uvicorn", "bench.static_upstream:app", "--port",
                               str(self.port), "--log-level", "warning", "--no-access-log"],
                              env={"BENCH_WWW": str(self.www)}, log=workdir / "upstream.out")
        if not wait_http(self.url + "/small", proc=self.proc):
            self.stop()
            log = (workdir / ("nginx.out" if nginx else "upstream.out")).read_text()[-2000:]
            raise RuntimeError(f"upstream ({self.kind}) did not start:\n{log}")
        self.sink_check = check_sink(self.port)

    def path(self, name: str) -> Path:
        return self.www / name

    def stop(self) -> None:
        stop(self.proc)
        if self.body_dir is not None:
            shutil.rmtree(self.body_dir, ignore_errors=True)


# The cache rows: a memory store that holds the large file (past the 64M default object
# limit), hits of files the upstream serves with Cache-Control (NGINX_CONF's /cached/).
SUB_FILTER = ("--sub-filter", "upstream=downstream", "--sub-filter", "proxy=relay",
              "--sub-filter-type", "application/json")
CACHE_FLAGS = ("--cache", "--cache-max-object", "128M", "--cache-max-size", "256M")
# (key, label, face, the pairing's flags) of each cache row: dp-<key>-cache.
CACHE_ROWS = (("asgi", "asgi", "asgi", ()), ("wsgi", "wsgi", "wsgi", ("--adapter", "wsgi")),
              ("wsgi-granian", "wsgi (granian)", "wsgi",
               ("--adapter", "wsgi", "--server", "granian")))

# The compress rows fetch this: JSON records of words and numbers, as an API answers.
DOCUMENT = "page.json"
DOCUMENT_SIZE = 64 * 1024
ACCEPT_ENCODING = "Accept-Encoding: gzip, deflate, br, zstd"  # what browsers send


def json_document(size: int) -> bytes:
    import random

    rng = random.Random(7)
    words = ("stream proxy upstream client header body chunk route filter worker pool "
             "gzip brotli zstd event server request response status").split()
    records: list[str] = []
    total = 2
    while total < size:
        record = json.dumps({"id": len(records), "name": " ".join(rng.sample(words, 3)),
                             "score": round(rng.random() * 100, 3), "active": rng.random() < .5,
                             "tags": rng.sample(words, 2)})
        records.append(record)
        total += len(record) + 1
    return ("[" + ",".join(records) + "]").encode()


def check_sink(port: int, size: int = 4 * MiB) -> str:
    """'ok' if /sink answers only after the whole body, with its length in X-Received-Length."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"POST /sink HTTP/1.1\r\nHost: bench\r\nContent-Length: {size}\r\n\r\n"
                     .encode() + bytes(MiB))
        sock.settimeout(0.5)
        try:
            early = sock.recv(65536)
        except TimeoutError:
            early = b""
        if early:
            return "answers before the body is read"
        sock.settimeout(10)
        sock.sendall(bytes(size - MiB))
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(65536)
            if not chunk:
                break
            head += chunk
    match = re.search(rb"(?i)\r\nx-received-length: *(\d+)", head)
    if not head.startswith(b"HTTP/1.1 200") or not match or int(match.group(1)) < size:
        return f"bad answer {head[:200]!r}"
    return "ok"


# -- measurements ---------------------------------------------------------------------------


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


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def tree_cpu_s(root: int) -> float:
    """User and system CPU seconds of the process tree's live processes."""
    total = 0
    for pid in tree_pids(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def tree_rss_mb(root: int, pids: list[int] | None = None) -> float:
    """Sum of VmRSS over the process tree, in MiB."""
    return sum(_status_kb(pid, "VmRSS:") for pid in (pids or tree_pids(root))) / 1024


class RssSampler:
    """Samples the RSS of a process tree every 50 ms; `peak` is the highest seen."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        pids, refreshed = tree_pids(self.root), time.monotonic()
        while not self._stop.is_set():
            if time.monotonic() - refreshed > 1:
                pids, refreshed = tree_pids(self.root), time.monotonic()
            self.peak = max(self.peak, tree_rss_mb(self.root, pids))
            self._stop.wait(0.05)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    return float(match.group(1)) * _UNITS[match.group(2)] if match else math.nan


# The external tools, when installed; --stand-ins empties this to use the Python stand-ins.
TOOLS: dict[str, str | None] = {
    "wrk": shutil.which("wrk"), "curl": shutil.which("curl"),
    "nginx": shutil.which("nginx") or next(  # /usr/sbin is not on every user's PATH
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None)}


def loadgen_name() -> str:
    return "wrk -t1 -c32 --latency" if TOOLS.get("wrk") else \
        "bench/loadgen.py (no wrk: 32 keep-alive connections over several processes)"


def transfer_name() -> str:
    return "curl" if TOOLS.get("curl") else "httpx (no curl)"


def load_small(url: str, seconds: int, headers: tuple[str, ...] = ()) -> dict[str, float]:
    """Small GETs at 32 connections: req/s, p50, p99 (ms), errors."""
    if not TOOLS.get("wrk"):
        from bench.loadgen import run_load

        return run_load(url, connections=32, seconds=seconds, headers=headers)
    extra = [arg for header in headers for arg in ("-H", header)]
    out = subprocess.run(["wrk", "-t1", "-c32", f"-d{seconds}s", "--latency", *extra, url],
                         capture_output=True, text=True, timeout=seconds + 30).stdout

    def grab(pattern: str) -> str:
        match = re.search(pattern, out, re.M)
        if not match:
            raise RuntimeError(f"unexpected wrk output: {out[-300:]!r}")
        return match.group(1)

    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), "
                              r"timeout (\d+)", out)
    if socket_errors:
        errors += sum(int(n) for n in socket_errors.groups())
    # Anchored: the thread-stats lines also contain percentages.
    return {"rps": float(grab(r"Requests/sec:\s+([\d.]+)")),
            "p50_ms": _ms(grab(r"^\s*50%\s+(\S+)")), "p99_ms": _ms(grab(r"^\s*99%\s+(\S+)")),
            "errors": float(errors)}


@dataclass
class Transfer:
    mbs: float  # 10^6 bytes per second
    ok: bool
    detail: str = ""
    samples: list[float] = field(default_factory=list)


def median_of(n: int, fn: Callable[[], Transfer]) -> Transfer:
    """Run a transfer n times: the median speed; ok only if every run was ok."""
    runs = [fn() for _ in range(n)]
    speeds = sorted(t.mbs for t in runs)
    bad = next((t for t in runs if not t.ok), None)
    return Transfer(speeds[len(speeds) // 2], bad is None, bad.detail if bad else "",
                    [t.mbs for t in runs])


def download(url: str, size: int) -> Transfer:
    if TOOLS.get("curl"):
        out = subprocess.run(
            ["curl", "-s", "-o", "/dev/null", "--max-time", str(TRANSFER_TIMEOUT),
             "-w", "%{http_code} %{size_download} %{speed_download}", url],
            capture_output=True, text=True, timeout=TRANSFER_TIMEOUT + 30).stdout.split()
        code, got, speed = out[0], int(out[1]), float(out[2])
    else:
        import httpx

        started, got = time.perf_counter(), 0
        with httpx.stream("GET", url, timeout=TRANSFER_TIMEOUT) as response:
            for chunk in response.iter_raw():
                got += len(chunk)
            code = str(response.status_code)
        speed = got / (time.perf_counter() - started)
    ok = code == "200" and got == size
    return Transfer(speed / 1e6, ok, "" if ok else f"status {code}, {got} of {size} bytes")


def upload(url: str, path: Path, chunked: bool) -> Transfer:
    """POST path to the sink, with Content-Length or chunked; ok if all of it arrived."""
    size = path.stat().st_size
    if TOOLS.get("curl"):
        with tempfile.NamedTemporaryFile(prefix="bench-head-") as head:
            # -T streams from the file; `Expect:` off so no contestant waits out curl's 1 s
            # 100-continue timer (that would measure the timer, not the transfer).
            args = ["curl", "-s", "-o", "/dev/null", "-D", head.name, "--max-time",
                    str(TRANSFER_TIMEOUT), "-X", "POST", "-T", str(path), "-H", "Expect:",
                    "-w", "%{http_code} %{speed_upload}", url]
            if chunked:
                args[-1:-1] = ["-H", "Transfer-Encoding: chunked"]
            out = subprocess.run(args, capture_output=True, text=True,
                                 timeout=TRANSFER_TIMEOUT + 30).stdout.split()
            headers = Path(head.name).read_text(errors="replace")
        code, speed = out[0], float(out[1])
    else:
        import httpx

        def blocks() -> Any:
            with path.open("rb") as fh:
                while block := fh.read(MiB):
                    yield block

        started = time.perf_counter()
        response = httpx.post(url, content=blocks(), timeout=TRANSFER_TIMEOUT,
                              headers={} if chunked else {"content-length": str(size)})
        speed = size / (time.perf_counter() - started)
        code = str(response.status_code)
        headers = "".join(f"{k}: {v}\r\n" for k, v in response.headers.items())
    match = re.search(r"(?im)^x-received-length: *(\d+)", headers)
    received = int(match.group(1)) if match else -1
    ok = code == "200" and received >= size
    detail = "" if ok else (f"status {code}" if code != "200" else
                            f"upstream received {max(received, 0)} of {size} bytes")
    return Transfer(speed / 1e6, ok, detail)


# -- contestants ------------------------------------------------------------------------------


@dataclass
class Contestant:
    key: str
    name: str
    face: str  # asgi, wsgi, or "-" for a reference row (direct, a server's ceiling)
    args: Callable[[int], list[str]]  # port -> command line
    dualproxy: bool = False
    workers: int = 1
    direct: bool = False
    tree: Path | None = None  # run from this checkout (its dualproxy on PYTHONPATH)
    small_only: bool = False  # small GETs only (a row compared on req/s alone)
    paired: Callable[[int], list[str]] | None = None  # the same without what the row measures
    # What a paired row GETs (with these request headers): the compress rows a document.
    path: str = "/small"
    headers: tuple[str, ...] = ()
    # A paired row's download too, on and off (the cache rows: a large hit): its path.
    download: str | None = None
    env: tuple[tuple[str, str], ...] = ()  # more environment for its process


# (face, server) of the pairings besides the defaults (dp-asgi: uvicorn, dp-wsgi: gunicorn).
OTHER_PAIRINGS = (("asgi", "granian"), ("wsgi", "granian"), ("wsgi", "uvicorn"),
                  ("asgi", "gunicorn"))
# Each pairing's row, and the ceiling of the server as that pairing runs it: the WSGI face
# on uvicorn and granian goes through the a2wsgi bridge on their ASGI interface, the ASGI
# face on gunicorn runs in uvicorn's worker; so those compare with the ASGI hello world.
PAIRING_ROWS = {"asgi-uvicorn": ("dp-asgi", "ceiling-uvicorn"),
                "wsgi-gunicorn": ("dp-wsgi", "ceiling-gunicorn"),
                "wsgi-uvicorn": ("dp-wsgi-uvicorn", "ceiling-uvicorn"),
                "asgi-gunicorn": ("dp-asgi-gunicorn", "ceiling-uvicorn"),
                "asgi-granian": ("dp-asgi-granian", "ceiling-granian-asgi"),
                "wsgi-granian": ("dp-wsgi-granian", "ceiling-granian-asgi")}

HEADER_FILTERS = ("--request-id", "--header-up", "X-Real-IP: {client}",
                  "--header-up=-Cookie", "--header-down", "+Cache-Control: no-store")


def contestants(upstream: str, baseline: Path | None = None,
                second: str = "SECOND") -> list[Contestant]:
    def dp(*extra: str, access_log: bool = False) -> Callable[[int], list[str]]:
        logs = ["--log-level", "info"] if access_log else ["--no-access-log", "--log-level",
                                                            "warning"]
        return lambda port: [PY, "-m", "dualproxy", "serve", "--upstream", upstream, "--bind",
                             f"127.0.0.1:{port}", *logs, *extra]

    def gunicorn(app: str) -> Callable[[int], list[str]]:
        return lambda port: [PY, "-m", "gunicorn", "-w", "1", "-k", "gthread", "--threads", "32",
                             "-b", f"127.0.0.1:{port}", "--log-level", "warning", app]

    def uvicorn(app: str) -> Callable[[int], list[str]]:
        return lambda port: [PY, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port),
                             "--loop", "uvloop", "--http", "httptools", "--no-access-log",
                             "--log-level", "warning", app]

    def granian(interface: str) -> Callable[[int], list[str]]:
        return lambda port: [PY, "-m", "granian", "--interface", interface, "--host",
                             "127.0.0.1", "--port", str(port), "--workers", "1", "--http", "1",
                             "--no-ws", "--log-level", "warning", f"bench.contestants.hello:"
                             f"{interface}"]

    return [
        Contestant("direct", "no proxy (straight to the upstream)", "-", lambda port: [],
                   direct=True),
        # The servers alone: what any face could reach on each (small GETs only).
        Contestant("ceiling-uvicorn", "uvicorn alone (hello world)", "-",
                   uvicorn("bench.contestants.hello:asgi"), small_only=True),
        Contestant("ceiling-gunicorn", "gunicorn gthread alone (hello world)", "-",
                   gunicorn("bench.contestants.hello:wsgi"), small_only=True),
        *(Contestant(f"ceiling-granian-{interface}",
                     f"granian {interface.upper()} alone (hello world)", "-",
                     granian(interface), small_only=True) for interface in ("asgi", "wsgi")),
        Contestant("dp-asgi", "dualproxy asgi (uvicorn)", "asgi", dp(), dualproxy=True),
        Contestant("dp-asgi-log", "dualproxy asgi (uvicorn), access log on", "asgi",
                   dp(access_log=True), dualproxy=True, paired=dp()),
        Contestant("dp-wsgi", "dualproxy wsgi (gunicorn)", "wsgi", dp("--adapter", "wsgi"),
                   dualproxy=True),
        Contestant("dp-wsgi-log", "dualproxy wsgi (gunicorn), access log on", "wsgi",
                   dp("--adapter", "wsgi", access_log=True), dualproxy=True,
                   paired=dp("--adapter", "wsgi")),
        # The other four face x server pairings (dp-asgi and dp-wsgi are the defaults).
        *(Contestant(f"dp-{face}-{server}", f"dualproxy {face} ({server})", face,
                     dp("--adapter", face, "--server", server), dualproxy=True)
          for face, server in OTHER_PAIRINGS),
        *(Contestant(f"dp-{face}-compress", f"dualproxy {face}, --compress, 64 KiB JSON",
                     face, dp(*adapter, "--compress"), dualproxy=True, paired=dp(*adapter),
                     path=f"/{DOCUMENT}", headers=(ACCEPT_ENCODING,))
          for face, adapter in (("asgi", ()), ("wsgi", ("--adapter", "wsgi")))),
        *([Contestant("dp-asgi-before", f"dualproxy asgi (uvicorn), {baseline.name}", "asgi",
                      dp(), tree=baseline),
           Contestant("dp-wsgi-before", f"dualproxy wsgi (gunicorn), {baseline.name}", "wsgi",
                      dp("--adapter", "wsgi"), tree=baseline)] if baseline else []),
        Contestant("seed", "seed pattern (FastAPI + httpx)", "asgi",
                   uvicorn("bench.contestants.seed_asgi:app")),
        Contestant("fpl", "fastapi-proxy-lib", "asgi",
                   uvicorn("bench.contestants.fastapi_proxy_lib_app:app")),
        Contestant("twin", "seed sync twin (Flask + httpx)", "wsgi",
                   gunicorn("bench.contestants.seed_wsgi:app")),
        Contestant("werkzeug", "werkzeug ProxyMiddleware", "wsgi",
                   gunicorn("bench.contestants.werkzeug_proxy:app")),
        # The built-in filters' cost: request ids and header rules both ways (the filter
        # chain runs), against the same proxy without them, alternating rounds.
        Contestant("dp-asgi-hdr", "dualproxy asgi, --request-id and header rules", "asgi",
                   dp(*HEADER_FILTERS), dualproxy=True, small_only=True, paired=dp()),
        Contestant("dp-wsgi-hdr", "dualproxy wsgi, --request-id and header rules", "wsgi",
                   dp("--adapter", "wsgi", *HEADER_FILTERS), dualproxy=True, small_only=True,
                   paired=dp("--adapter", "wsgi")),
        # The cache: hits of a small GET and of the large file, against the same proxy
        # without cache (every request upstream), alternating rounds.
        # The WSGI face also on granian, whose server costs far less a request than
        # gunicorn's threaded worker (which bounds a hit there).
        *(Contestant(f"dp-{key}-cache", f"dualproxy {name}, --cache (memory), hits", face,
                     dp(*adapter, *CACHE_FLAGS), dualproxy=True, paired=dp(*adapter),
                     path="/cached/small", download="/cached/big")
          for key, name, face, adapter in CACHE_ROWS),
        # Tracing's cost: every span made and ended, none exported (the SDK's provider,
        # its default sampler, OTEL_TRACES_EXPORTER=none), against the same proxy without:
        # what each request pays on its way (never the console exporter, a debugging aid
        # that writes a line a span). The -otlp rows add what a user with a collector pays
        # besides: the OTLP/HTTP batch exporter (the default), its thread encoding spans
        # and posting them to nginx, which takes and drops them.
        *(Contestant(f"dp-{face}-{kind}", f"dualproxy {face}, --tracing (exporter {name})",
                     face, dp(*adapter, "--tracing"), dualproxy=True, small_only=True,
                     paired=dp(*adapter), env=(("OTEL_TRACES_EXPORTER", name),
                                               ("OTEL_EXPORTER_OTLP_ENDPOINT", upstream)))
          for kind, name in (("trace", "none"), ("otlp", "otlp"))
          for face, adapter in (("asgi", ()), ("wsgi", ("--adapter", "wsgi")))),
        # sub_filter: a text replacement across the 64 KiB JSON document (its words recur
        # in every record), against the same proxy passing it untouched.
        *(Contestant(f"dp-{face}-sub", f"dualproxy {face}, --sub-filter, 64 KiB JSON", face,
                     dp(*adapter, *SUB_FILTER), dualproxy=True, small_only=True,
                     paired=dp(*adapter), path=f"/{DOCUMENT}")
          for face, adapter in (("asgi", ()), ("wsgi", ("--adapter", "wsgi")))),
        # X-Forwarded-Prefix: a mount sends it (the default), against the same mount without.
        *(Contestant(f"dp-{face}-xfp", f"dualproxy {face}, --mount with X-Forwarded-Prefix",
                     face, dp(*adapter, "--mount", "/api"), dualproxy=True, small_only=True,
                     paired=dp(*adapter, "--mount", "/api", "--no-forwarded-prefix"),
                     path="/api/small")
          for face, adapter in (("asgi", ()), ("wsgi", ("--adapter", "wsgi")))),
        Contestant("dp-asgi-pool", "dualproxy asgi, a pool of 2 upstreams", "asgi",
                   dp("--upstream", second), dualproxy=True, small_only=True),
        Contestant("dp-wsgi-pool", "dualproxy wsgi, a pool of 2 upstreams", "wsgi",
                   dp("--adapter", "wsgi", "--upstream", second), dualproxy=True,
                   small_only=True),
        Contestant("dp-asgi-2w", "dualproxy asgi, 2 workers", "asgi", dp("--workers", "2"),
                   dualproxy=True, workers=2),
        Contestant("dp-wsgi-2w", "dualproxy wsgi, 2 workers", "wsgi",
                   dp("--adapter", "wsgi", "--workers", "2"), dualproxy=True, workers=2),
    ]


@dataclass
class Result:
    key: str
    name: str
    face: str
    workers: int
    dualproxy: bool
    status: str = "ok"  # ok, or why the contestant failed as a whole
    rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    load_errors: int | None = None
    off_rps: float | None = None  # access-log rows: the same proxy with it off, same rounds
    off_down_mbs: float | None = None  # cache rows: the large download without cache
    off_cpu_us_per_req: float | None = None
    body_bytes: int | None = None  # compress rows: one response's body as sent, on and off
    off_body_bytes: int | None = None
    coding: str | None = None  # compress rows: the Content-Encoding the proxy chose
    cpu_us_per_req: float | None = None  # the proxy's CPU per small GET (steadier than req/s)
    down_mbs: float | None = None
    up_mbs: float | None = None
    chunked_up: str | None = None  # ok / failed (why)
    down_samples: list[float] = field(default_factory=list)  # MB/s of each repeat
    up_samples: list[float] = field(default_factory=list)
    idle_rss_mb: float | None = None
    peak_rss_mb: float | None = None
    big_peak_over_idle_mb: float | None = None  # dualproxy: the 100 MiB transfers
    gib_peak_over_idle_mb: float | None = None  # dualproxy: 1 GiB each way
    failures: dict[str, str] = field(default_factory=dict)  # step -> why


def step(result: Result, name: str, fn: Callable[[], Any]) -> Any:
    """Run one measurement; a failure is recorded for that figure, the run goes on."""
    try:
        return fn()
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        result.failures[name] = f"{type(exc).__name__}: {exc}"[:200]
        return None


def run_contestant(c: Contestant, upstream: Upstream, work: Path,
                   opts: argparse.Namespace) -> Result:
    result = Result(c.key, c.name, c.face, c.workers, c.dualproxy)
    proc = None
    if c.direct:
        base = upstream.url
    else:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        env = {"BENCH_UPSTREAM": upstream.url}
        if c.tree is not None:  # that checkout's dualproxy; no bytecode written into it
            env.update(PYTHONPATH=str(c.tree), PYTHONDONTWRITEBYTECODE="1")
        proc = start(c.args(port), env=env, log=work / f"{c.key}.log", cwd=c.tree or ROOT)
    try:
        if proc is not None:
            if not wait_http(base + "/small", timeout=60, proc=proc):
                log = (work / f"{c.key}.log").read_text(errors="replace").strip()
                last = log.splitlines()[-1] if log else "no output"
                result.status = f"failed to start: {last}"[:160]
                return result
            deadline = time.monotonic() + 30  # every worker up before measuring
            while len(tree_pids(proc.pid)) < c.workers + (c.workers > 1) and \
                    time.monotonic() < deadline:
                time.sleep(0.2)
        small = step(result, "warm-up", lambda: load_small(base + "/small", 2))
        if small is not None and small["rps"] == 0:
            result.status = "failed: no successful small GET"
            return result
        cpu_before = tree_cpu_s(proc.pid) if proc is not None else 0.0
        small = step(result, "small GETs", lambda: load_small(base + "/small", opts.seconds))
        if small and proc is not None and small["rps"] > 0:
            result.cpu_us_per_req = ((tree_cpu_s(proc.pid) - cpu_before) * 1e6
                                     / (small["rps"] * opts.seconds))
        if small:
            result.rps, result.p50_ms, result.p99_ms = (
                None if math.isnan(small[k]) else small[k] for k in ("rps", "p50_ms", "p99_ms"))
            result.load_errors = int(small["errors"])
        if c.workers > 1 or c.small_only:
            return result
        big = upstream.path("big")
        if proc is not None:
            time.sleep(0.5)
            result.idle_rss_mb = tree_rss_mb(proc.pid)
        sampler = RssSampler(proc.pid if proc is not None else os.getpid())
        with sampler:
            n, size = opts.repeat, big.stat().st_size
            down = step(result, "download",
                        lambda: median_of(n, lambda: download(base + "/big", size)))
            up = step(result, "upload",
                      lambda: median_of(n, lambda: upload(base + "/sink", big, chunked=False)))
            chunked = step(result, "chunked upload",
                           lambda: upload(base + "/sink", big, chunked=True))
        for name, t in (("download", down), ("upload", up)):
            if t is not None:
                attr = "down" if name == "download" else "up"
                setattr(result, f"{attr}_mbs", t.mbs)
                setattr(result, f"{attr}_samples", t.samples)
                if not t.ok:
                    result.failures[name] = t.detail
        if chunked is not None:
            result.chunked_up = "ok" if chunked.ok else f"failed ({chunked.detail})"
        elif "chunked upload" in result.failures:
            result.chunked_up = "failed (error)"
        if proc is None:
            return result
        result.peak_rss_mb = sampler.peak
        if c.dualproxy:
            result.big_peak_over_idle_mb = sampler.peak - (result.idle_rss_mb or 0)
        if c.dualproxy and opts.gib_check:
            gib = upstream.path("big1g")
            with RssSampler(proc.pid) as gib_rss:
                checks = [step(result, "1 GiB download",
                               lambda: download(base + "/big1g", GiB)),
                          step(result, "1 GiB upload", lambda: upload(base + "/sink", gib, False)),
                          step(result, "1 GiB chunked upload",
                               lambda: upload(base + "/sink", gib, True))]
            for name, t in zip(("1 GiB download", "1 GiB upload", "1 GiB chunked upload"),
                               checks, strict=True):
                if t is not None and not t.ok:
                    result.failures[name] = t.detail
            if all(t is not None and t.ok for t in checks):
                result.gib_peak_over_idle_mb = gib_rss.peak - (result.idle_rss_mb or 0)
        if proc.poll() is not None:
            result.status = f"failed: exited with {proc.returncode} during the run"
    finally:
        if proc is not None:
            stop(proc)
    return result


def run_log_pair(c: Contestant, upstream: Upstream, work: Path,
                 opts: argparse.Namespace) -> Result:
    """A feature's cost (the access log, compression): the proxy with it on and off, both
    running, GETs of `c.path` in alternating rounds (on, off, off, on, ...) so the
    machine's drift hits both alike."""
    assert c.paired is not None
    result = Result(c.key, c.name, c.face, c.workers, c.dualproxy)
    ports = {"on": free_port(), "off": free_port()}
    procs = {"on": start(c.args(ports["on"]), dict(c.env), log=work / f"{c.key}.log"),
             "off": start(c.paired(ports["off"]), log=work / f"{c.key}-off.log")}
    requests = dict.fromkeys(procs, 0.0)
    cpu = dict.fromkeys(procs, 0.0)
    try:
        for side, proc in procs.items():
            url = f"http://127.0.0.1:{ports[side]}{c.path}"
            if not wait_http(url, timeout=60, proc=proc):
                result.status = f"failed to start ({side})"
                return result
            step(result, "warm-up", partial(load_small, url, 2, c.headers))
        if c.headers:
            sizes = step(result, "one response", partial(_one_response, ports, c))
            if sizes is not None:
                result.body_bytes, result.off_body_bytes, result.coding = sizes
        rounds, each = 4, max(1, opts.seconds // 2)
        for n in range(rounds):
            for side in (("on", "off") if n % 2 == 0 else ("off", "on")):
                before = tree_cpu_s(procs[side].pid)
                got = step(result, "small GETs", partial(
                    load_small, f"http://127.0.0.1:{ports[side]}{c.path}", each, c.headers))
                if got:
                    requests[side] += got["rps"] * each
                    cpu[side] += tree_cpu_s(procs[side].pid) - before
        seconds = rounds * each
        result.rps, result.off_rps = requests["on"] / seconds, requests["off"] / seconds
        if requests["on"] and requests["off"]:
            result.cpu_us_per_req = cpu["on"] * 1e6 / requests["on"]
            result.off_cpu_us_per_req = cpu["off"] * 1e6 / requests["off"]
        if c.download is not None:
            _paired_downloads(c, c.download, ports, upstream, result, opts)
    finally:
        for proc in procs.values():
            stop(proc)
    return result


def _paired_downloads(c: Contestant, path: str, ports: dict[str, int], upstream: Upstream,
                      result: Result, opts: argparse.Namespace) -> None:
    """The large file through both sides (median of --repeat each, after one download
    that fills the cache): `down_mbs` with the feature, `off_down_mbs` without."""
    size = upstream.path(path.rsplit("/", 1)[1]).stat().st_size
    urls = {side: f"http://127.0.0.1:{port}{path}" for side, port in ports.items()}
    if step(result, "download", lambda: download(urls["on"], size)) is None:
        return
    on = step(result, "download", lambda: median_of(opts.repeat,
                                                    lambda: download(urls["on"], size)))
    off = step(result, "download off", lambda: median_of(opts.repeat,
                                                         lambda: download(urls["off"], size)))
    for attr, got in (("down_mbs", on), ("off_down_mbs", off)):
        if got is not None and got.ok:
            setattr(result, attr, got.mbs)


def _one_response(ports: dict[str, int], c: Contestant) -> tuple[int, int, str | None]:
    """The body bytes one response takes with the feature on and off, and its coding."""
    import httpx

    headers = dict(header.split(": ", 1) for header in c.headers)
    sizes: dict[str, int] = {}
    coding = None
    for side, port in ports.items():
        with httpx.stream("GET", f"http://127.0.0.1:{port}{c.path}", headers=headers,
                          timeout=30) as response:
            sizes[side] = sum(len(chunk) for chunk in response.iter_raw())
            if side == "on":
                coding = response.headers.get("content-encoding")
    return sizes["on"], sizes["off"], coding


# -- report -----------------------------------------------------------------------------------


def fmt(value: float | None, spec: str = ",.0f") -> str:
    return "—" if value is None or math.isnan(value) else format(value, spec)


def cell(r: Result, attr: str, step_name: str, spec: str = ",.0f") -> str:
    if step_name in r.failures:
        return "failed"
    return fmt(getattr(r, attr), spec)


def main_table(results: list[Result], size_label: str) -> list[str]:
    lines = [f"| contestant | small GET req/s | p50 ms | p99 ms | {size_label} down MB/s | up MB/s "
             "| chunked up | idle RSS MB | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        name = f"**{r.name}**" if r.dualproxy else r.name
        if r.status != "ok":
            lines.append(f"| {name} | {r.status} | | | | | | | |")
            continue
        chunked = r.chunked_up or "—"
        lines.append(
            f"| {name} | {cell(r, 'rps', 'small GETs')} | {cell(r, 'p50_ms', 'small GETs', '.1f')}"
            f" | {cell(r, 'p99_ms', 'small GETs', '.1f')} | {cell(r, 'down_mbs', 'download')}"
            f" | {cell(r, 'up_mbs', 'upload')} | {chunked} | {fmt(r.idle_rss_mb)}"
            f" | {fmt(r.peak_rss_mb)} |")
    return lines


# figure, attribute, higher is better
FIGURES = [("small GET req/s", "rps", True), ("p50 latency ms", "p50_ms", False),
           ("p99 latency ms", "p99_ms", False), ("{size} download MB/s", "down_mbs", True),
           ("{size} upload MB/s", "up_mbs", True), ("peak RSS MB", "peak_rss_mb", False)]
PEERS = {"asgi": ("seed", "fpl"), "wsgi": ("twin", "werkzeug")}
SHORT = {"seed": "seed", "fpl": "fastapi-proxy-lib", "twin": "sync twin", "werkzeug": "werkzeug"}


def value(r: Result | None, attr: str) -> float | None:
    if r is None or r.status != "ok":
        return None
    v = getattr(r, attr)
    step_of = {"rps": "small GETs", "p50_ms": "small GETs", "p99_ms": "small GETs",
               "down_mbs": "download", "up_mbs": "upload"}
    if v is None or math.isnan(v) or step_of.get(attr) in r.failures:
        return None
    return float(v)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(by: dict[str, Result], size_label: str) -> tuple[list[str], dict[str, Any]]:
    """Each dualproxy figure / the seed pattern's, and / the best same-face peer's."""
    lines = ["dualproxy / reference (above 1 is better for req/s and MB/s, below 1 for "
             "latency and RSS):", "",
             "| figure | asgi | ÷ seed pattern | ÷ best asgi peer | wsgi | ÷ seed pattern "
             "| ÷ best wsgi peer |", "|---|---|---|---|---|---|---|"]
    doc: dict[str, Any] = {}
    seed = by.get("seed")
    for label, attr, higher in FIGURES:
        row = [label.format(size=size_label)]
        for face in ("asgi", "wsgi"):
            mine = value(by.get(f"dp-{face}"), attr)
            peers = [(value(by.get(k), attr), SHORT[k]) for k in PEERS[face] if k in by]
            peers = [(v, n) for v, n in peers if v is not None]
            best = (max if higher else min)(peers, key=lambda p: p[0]) if peers else None
            vs_seed = ratio(mine, value(seed, attr))
            vs_best = ratio(mine, best[0]) if best else None
            spec = ",.0f" if attr in ("rps", "down_mbs", "up_mbs", "peak_rss_mb") else ".1f"
            row += [fmt(mine, spec), fmt(vs_seed, ".2f") + ("×" if vs_seed else ""),
                    (fmt(vs_best, ".2f") + f"× ({best[1]})") if best and vs_best else "—"]
            doc.setdefault(face, {})[attr] = {"value": mine, "vs_seed": vs_seed,
                                              "vs_best_peer": vs_best,
                                              "best_peer": best[1] if best else None}
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for face in ("asgi", "wsgi"):
        r = by.get(f"dp-{face}-log")
        on = ratio(value(r, "rps"), r.off_rps) if r is not None else None
        cpu_on, cpu_off = (r.cpu_us_per_req, r.off_cpu_us_per_req) if r else (None, None)
        cpu = ratio(cpu_off, cpu_on)
        doc.setdefault(face, {}).update(access_log_on_over_off=on,
                                        access_log_cpu_off_over_on=cpu)
        lines.append(f"{face}: access log on / off small-GET req/s = {fmt(on, '.2f')}; CPU per "
                     f"request off / on = {fmt(cpu, '.2f')} ({fmt(cpu_off, '.0f')} vs "
                     f"{fmt(cpu_on, '.0f')} µs)")
    for face in ("asgi", "wsgi"):
        r = by.get(f"dp-{face}-hdr")
        on = ratio(value(r, "rps"), r.off_rps) if r is not None else None
        doc.setdefault(face, {})["header_filters_on_over_off"] = on
        lines.append(f"{face}: request id + header rules on / off small-GET req/s = "
                     f"{fmt(on, '.2f')}")
    for face in ("asgi", "wsgi"):
        for key, what in (("sub", "--sub-filter (64 KiB JSON)"),
                          ("xfp", "X-Forwarded-Prefix under a mount")):
            r = by.get(f"dp-{face}-{key}")
            if r is None:
                continue
            on = ratio(value(r, "rps"), r.off_rps)
            doc.setdefault(face, {})[f"{key}_on_over_off"] = on
            lines.append(f"{face}: {what} on / off req/s = {fmt(on, '.2f')} ({fmt(r.rps)} vs "
                         f"{fmt(r.off_rps)})")
    for face in (key for key, *_ in CACHE_ROWS):
        r = by.get(f"dp-{face}-cache")
        if r is None:
            continue
        hits, big = ratio(value(r, "rps"), r.off_rps), ratio(r.down_mbs, r.off_down_mbs)
        doc.setdefault(face, {}).update(cache_hit_over_uncached=hits,
                                        cache_big_hit_over_uncached=big,
                                        cache_big_hit_mbs=[r.down_mbs, r.off_down_mbs])
        lines.append(f"{face}: --cache hits / uncached small-GET req/s = {fmt(hits, '.2f')} "
                     f"({fmt(r.rps)} vs {fmt(r.off_rps)}); {size_label} hit "
                     f"{fmt(r.down_mbs)} vs uncached {fmt(r.off_down_mbs)} MB/s "
                     f"({fmt(big, '.2f')}×)")
    for face, kind, key in ((face, kind, key) for kind, key in (("trace", "tracing"),
                                                                 ("otlp", "tracing_otlp"))
                            for face in ("asgi", "wsgi")):
        r = by.get(f"dp-{face}-{kind}")
        if r is None:
            continue
        figures = {f"{key}_on_over_off": ratio(value(r, "rps"), r.off_rps),
                   f"{key}_cpu_us_on": r.cpu_us_per_req, f"{key}_cpu_us_off":
                   r.off_cpu_us_per_req}
        doc.setdefault(face, {}).update(figures)
        shown = [fmt(v, f) for v, f in zip(figures.values(), (".2f", ".0f", ".0f"), strict=True)]
        lines.append("{}: --tracing ({}) on / off small-GET req/s = {}; CPU per request {} vs "
                     "{} µs".format(face, "OTLP" if kind == "otlp" else "exporter none",
                                    *shown))
    for face in ("asgi", "wsgi"):
        r = by.get(f"dp-{face}-compress")
        if r is None:
            continue
        on = ratio(value(r, "rps"), r.off_rps)
        cpu_on, cpu_off = r.cpu_us_per_req, r.off_cpu_us_per_req
        # The CPU compression adds, per MB of the upstream's (identity) bytes.
        per_mb = ((cpu_on - cpu_off) / (r.off_body_bytes / 1e6)
                  if cpu_on is not None and cpu_off is not None and r.off_body_bytes else None)
        doc.setdefault(face, {}).update(
            compress_on_over_off=on, compress_cpu_us_on=cpu_on, compress_cpu_us_off=cpu_off,
            compress_ms_per_mb=per_mb / 1e3 if per_mb is not None else None,
            compress_bytes=[r.body_bytes, r.off_body_bytes], compress_coding=r.coding)
        lines.append(f"{face}: --compress on / off req/s (64 KiB JSON, {r.coding or 'identity'}"
                     f") = {fmt(on, '.2f')}; CPU per request {fmt(cpu_on, '.0f')} vs "
                     f"{fmt(cpu_off, '.0f')} µs ({fmt(per_mb and per_mb / 1e3, '.1f')} ms per "
                     f"MB compressed); {fmt(r.body_bytes)} vs {fmt(r.off_body_bytes)} bytes sent")
    for face in ("asgi", "wsgi"):
        one, two = value(by.get(f"dp-{face}"), "rps"), value(by.get(f"dp-{face}-2w"), "rps")
        scale = ratio(two, one)
        doc.setdefault(face, {})["scaling_2w_over_1w"] = scale
        lines.append(f"{face}: 2 workers / 1 worker small-GET req/s = {fmt(scale, '.2f')}")
    lines += ["", *pairing_table(by, size_label, doc)]
    for face in ("asgi", "wsgi"):
        r = by.get(f"dp-{face}")
        if r is not None and r.idle_rss_mb is not None:
            lines.append(f"{face}: RSS over idle ({r.idle_rss_mb:.0f} MB) while streaming "
                         f"{size_label}: {fmt(r.big_peak_over_idle_mb, '.1f')} MB, 1 GiB each way: "
                         f"{fmt(r.gib_peak_over_idle_mb, '.1f')} MB")
    return lines, doc


def pairing_table(by: dict[str, Result], size_label: str, doc: dict[str, Any]) -> list[str]:
    """The six face x server pairings side by side: each against its server's hello world
    (small GETs) and against no proxy at all (transfers)."""
    direct = by.get("direct")
    lines = [f"the pairings (÷ ceiling: of the server's hello world as the pairing runs it; "
             f"÷ direct: of {size_label} straight from the upstream):", "",
             "| pairing | small GET req/s | p99 ms | ÷ ceiling | down MB/s | ÷ direct "
             "| up MB/s | ÷ direct |", "|---|---|---|---|---|---|---|---|"]
    for pairing, (key, ceiling) in PAIRING_ROWS.items():
        r = by.get(key)
        if r is None:
            continue
        rps, up, down = value(r, "rps"), value(r, "up_mbs"), value(r, "down_mbs")
        of_ceiling = ratio(rps, value(by.get(ceiling), "rps"))
        down_direct, up_direct = ratio(down, value(direct, "down_mbs")), \
            ratio(up, value(direct, "up_mbs"))
        doc.setdefault("pairings", {})[pairing] = {
            "key": key, "rps": rps, "p99_ms": value(r, "p99_ms"), "of_ceiling": of_ceiling,
            "ceiling": ceiling, "down_mbs": down, "down_of_direct": down_direct,
            "up_mbs": up, "up_of_direct": up_direct}
        lines.append(f"| {pairing} | {fmt(rps)} | {fmt(value(r, 'p99_ms'), '.1f')} | "
                     f"{fmt(of_ceiling, '.0%')} ({ceiling}) | {fmt(down)} | "
                     f"{fmt(down_direct, '.0%')} | {fmt(up)} | {fmt(up_direct, '.0%')} |")
    return lines


def before_after(by: dict[str, Result], size_label: str) -> list[str]:
    """dualproxy now against the --baseline-tree checkout, same run, same upstream."""
    lines = ["dualproxy after / before (--baseline-tree; above 1 is better for req/s and MB/s, "
             "below 1 for latency and RSS):", "",
             "| figure | asgi before | asgi after | after ÷ before | wsgi before | wsgi after "
             "| after ÷ before |", "|---|---|---|---|---|---|---|"]
    for label, attr, _ in FIGURES:
        row = [label.format(size=size_label)]
        for face in ("asgi", "wsgi"):
            before = value(by.get(f"dp-{face}-before"), attr)
            after = value(by.get(f"dp-{face}"), attr)
            spec = ",.0f" if attr in ("rps", "down_mbs", "up_mbs", "peak_rss_mb") else ".1f"
            change = ratio(after, before)
            row += [fmt(before, spec), fmt(after, spec),
                    fmt(change, ".2f") + ("×" if change else "")]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def targets(by: dict[str, Result], quick: bool,
            size_label: str = "100 MiB") -> list[tuple[str, str]]:
    """(target, PASS/FAIL/n/a: why)."""
    out: list[tuple[str, str]] = []

    def check(name: str, a: float | None, b: float | None, factor: float,
              above: bool = False) -> None:
        if a is None or b is None:
            out.append((name, "n/a (a figure is missing)"))
        else:
            passed = a > factor * b if above else a >= factor * b
            out.append((name, f"{'PASS' if passed else 'FAIL'} "
                              f"({a:,.1f} vs {factor:g} × {b:,.1f})"))

    def rps(key: str) -> float | None:
        return value(by.get(key), "rps")

    check("asgi >= 10x seed pattern req/s", rps("dp-asgi"), rps("seed"), 10)
    p99 = value(by.get("dp-asgi"), "p99_ms")
    out.append(("asgi p99 <= 25 ms", "n/a (missing)" if p99 is None else
                f"{'PASS' if p99 <= 25 else 'FAIL'} ({p99:.1f} ms)"))
    check("wsgi >= 2x sync twin req/s", rps("dp-wsgi"), rps("twin"), 2)
    check("wsgi >= 1.2x werkzeug req/s", rps("dp-wsgi"), rps("werkzeug"), 1.2)
    for face in ("asgi", "wsgi"):
        for label, attr in (("down", "down_mbs"), ("up", "up_mbs")):
            check(f"{face} {size_label} {label} >= 2x seed pattern MB/s",
                  value(by.get(f"dp-{face}"), attr), value(by.get("seed"), attr), 2)
    for face in ("asgi", "wsgi"):
        r = by.get(f"dp-{face}")
        name = f"{face} 1 GiB streaming RSS within {RSS_BUDGET_MB} MB of idle"
        if r is None or r.gib_peak_over_idle_mb is None:
            out.append((name, "n/a (not run with --quick)" if quick else "n/a (missing)"))
        else:
            out.append((name, f"{'PASS' if r.gib_peak_over_idle_mb <= RSS_BUDGET_MB else 'FAIL'}"
                              f" (+{r.gib_peak_over_idle_mb:.1f} MB; {size_label}: "
                              f"+{fmt(r.big_peak_over_idle_mb, '.1f')} MB)"))
    for face in ("asgi", "wsgi"):
        check(f"{face} a pool of 2 upstreams >= 0.9x one upstream req/s",
              rps(f"dp-{face}-pool"), rps(f"dp-{face}"), 0.9)
    for face in ("asgi", "wsgi"):
        check(f"{face} 2 workers >= 1.6x one worker", rps(f"dp-{face}-2w"), rps(f"dp-{face}"),
              1.6)
    for face in ("asgi", "wsgi"):
        paired = by.get(f"dp-{face}-log")
        check(f"{face} access log on >= 0.90x off req/s", rps(f"dp-{face}-log"),
              paired.off_rps if paired is not None else None, 0.9)
    for face in (key for key, *_ in CACHE_ROWS):
        cached = by.get(f"dp-{face}-cache")
        if cached is None:
            continue
        check(f"{face} cache hits >= 2x uncached req/s", rps(f"dp-{face}-cache"),
              cached.off_rps, 2)
        check(f"{face} {size_label} cache hit >= uncached MB/s", cached.down_mbs,
              cached.off_down_mbs, 1)
    # Issue 22: granian, and every pairing against its ceiling and against no proxy.
    check("wsgi-granian >= 2x wsgi-gunicorn req/s", rps("dp-wsgi-granian"), rps("dp-wsgi"), 2)
    check("asgi-granian > asgi-uvicorn req/s", rps("dp-asgi-granian"), rps("dp-asgi"), 1,
          above=True)
    check("asgi-uvicorn >= 25% of uvicorn's hello world req/s", rps("dp-asgi"),
          rps("ceiling-uvicorn"), 0.25)
    check("asgi-granian >= 20% of granian's hello world req/s", rps("dp-asgi-granian"),
          rps("ceiling-granian-asgi"), 0.2)
    for pairing, (key, _) in PAIRING_ROWS.items():
        if key not in by:
            continue
        for label, attr in (("down", "down_mbs"), ("up", "up_mbs")):
            check(f"{pairing} {size_label} {label} >= 60% of direct MB/s",
                  value(by.get(key), attr), value(by.get("direct"), attr), 0.6)
    return out


# What the chart draws: (title, attribute, the step whose failure blanks it). Each panel
# lists only the rows that have that figure, so rows measured for small GETs alone (2
# workers, pools, the access-log pairs, the servers' ceilings) leave no empty slots.
HTTP_PANELS = [("small GET req/s (32 connections)", "rps", "small GETs"),
               ("small GET p99 ms (lower is better)", "p99_ms", "small GETs"),
               ("{size} download MB/s", "down_mbs", "download"),
               ("{size} upload MB/s (Content-Length)", "up_mbs", "upload")]
WS_PANELS = [("WebSocket msg/s (32 sockets, 32-byte messages)", "msgs_per_s", "small messages"),
             ("WebSocket 1 MiB messages MB/s", "big_mbs", "1 MiB messages")]
WS_REFERENCES = ("direct", "nginx")  # the WebSocket rows' yardsticks, drawn as references
COLORS = {"dualproxy": "#1f6fb5", "peer": "#8a8a8a", "reference": "#d9d9d9"}
# A reference bar this many times the largest other bar is cut at the panel's edge (with
# its value written), so the proxies' bars stay readable next to direct and a bare server.
OFF_SCALE = 2.5

Bar = tuple[str, float | None, str]  # (row name, value or None when that step failed, kind)


def http_bars(results: list[Result], attr: str, step_name: str) -> list[Bar]:
    bars: list[Bar] = []
    for r in results:
        if r.status != "ok" or r.key.endswith(("-compress", "-sub")):  # not small GETs
            continue
        kind = "reference" if r.face == "-" else "dualproxy" if r.dualproxy else "peer"
        v = value(r, attr)
        if v is not None or step_name in r.failures:
            bars.append((r.name, v, kind))
    return bars


def ws_bars(rows: list[dict[str, Any]], attr: str, step_name: str) -> list[Bar]:
    bars: list[Bar] = []
    for r in rows:
        if r.get("status") != "ok":
            continue
        kind = ("reference" if r["key"] in WS_REFERENCES else
                "dualproxy" if r["key"].startswith("dp-") else "peer")
        v = r.get(attr)
        failed = step_name in r.get("failures", {})
        if v is not None and not failed and not math.isnan(v):
            bars.append((r["name"], float(v), kind))
        elif failed:
            bars.append((r["name"], None, kind))
    return bars


def draw_panel(ax: Any, title: str, bars: list[Bar]) -> None:
    """Horizontal bars, one per row that has the figure, each labelled with its value."""
    values = [v or 0.0 for _, v, _ in bars]
    others = [v or 0.0 for _, v, kind in bars if kind != "reference"]
    top = max(values, default=1.0) or 1.0
    if others and max(others) > 0 and top > OFF_SCALE * max(others):
        top = max(others) * 1.3
    limit = top * 1.22
    ys = range(len(bars))
    shown = [min(v, top) for v in values]
    for y, (_, v, kind), width in zip(ys, bars, shown, strict=True):
        reference = kind == "reference"
        ax.barh(y, width, color=COLORS[kind], hatch="//" if reference else None,
                edgecolor="#8a8a8a" if reference else "none", linewidth=0)
        label = "failed" if v is None else f"{v:,.1f}" if v < 20 else f"{v:,.0f}"
        if v is not None and v > top:
            label += " (off scale)"
        ax.text(width + limit * 0.01, y, label, va="center", fontsize=8)
    ax.set_yticks(list(ys))
    ax.set_yticklabels([name for name, _, _ in bars], fontsize=8)
    ax.set_ylim(len(bars) - 0.5, -0.5)
    ax.set_xlim(0, limit)
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="x", labelsize=8)
    ax.xaxis.set_major_formatter(lambda x, _: f"{x:,.0f}")


def chart(results: list[Result], path: Path, subtitle: str, size_label: str,
          websocket: list[dict[str, Any]] | None = None) -> bool:
    """The bar chart of one run: the HTTP panels, then the WebSocket ones; a panel no row
    has a figure for is left out."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        print("matplotlib not installed: no chart")
        return False
    panels = [(title.format(size=size_label), http_bars(results, attr, step_name))
              for title, attr, step_name in HTTP_PANELS]
    panels += [(title, ws_bars(websocket or [], attr, step_name))
               for title, attr, step_name in WS_PANELS]
    panels = [(title, bars) for title, bars in panels if bars]
    if not panels:
        print("nothing measured: no chart")
        return False
    rows = math.ceil(len(panels) / 2)
    heights = [max(len(panels[i][1]), len(panels[i + 1][1]) if i + 1 < len(panels) else 0)
               for i in range(0, len(panels), 2)]
    fig, axes = plt.subplots(rows, 2, figsize=(16, 1.2 + 0.32 * sum(heights) + 0.9 * rows),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, (title, bars) in zip(axes.flat, panels, strict=False):
        draw_panel(ax, title, bars)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.legend(handles=[Patch(color=COLORS["dualproxy"], label="dualproxy"),
                        Patch(color=COLORS["peer"], label="the usual alternatives"),
                        Patch(facecolor=COLORS["reference"], edgecolor="#8a8a8a", hatch="//",
                              label="references: no proxy, a server alone, nginx")],
               loc="upper right", bbox_to_anchor=(0.98, 0.985), ncol=3, fontsize=8,
               frameon=False)
    fig.suptitle("dualproxy and the usual alternatives, one run on a shared 2-core machine\n"
                 f"{subtitle}", fontsize=11, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.97 - 0.2 / fig.get_figheight()))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def chart_from_json(json_path: Path, png_path: Path) -> bool:
    """Draw the chart again from a results file (latest.json or latest-ws.json)."""
    doc = json.loads(json_path.read_text())
    known = {f for f in Result.__dataclass_fields__}
    results = [Result(**{k: v for k, v in r.items() if k in known})
               for r in doc.get("results", [])]
    size = doc.get("transfer_bytes")
    size_label = f"{size // MiB} MiB" if size else "100 MiB"
    subtitle = ", ".join(str(doc[k]) for k in ("started", "upstream") if doc.get(k)) or \
        json_path.name
    if doc.get("loadgen"):
        subtitle += f", {doc['loadgen'].split(' (')[0]}, {size_label} transfers"
    return chart(results, png_path, subtitle, size_label, doc.get("websocket") or [])


# -- WebSocket rows (bench/wsbench.py) ----------------------------------------------------------


def ws_section(opts: argparse.Namespace) -> tuple[list[str], list[tuple[str, str]], Any]:
    """Run the WebSocket rows: (table lines, targets, JSON)."""
    from bench import wsbench

    def chosen(key: str) -> bool:
        return not opts.only or key in opts.only

    def ready(port: int, proc: subprocess.Popen[bytes]) -> bool:
        return wait_http(f"http://127.0.0.1:{port}/", proc=proc)

    results = wsbench.run_rows(chosen, opts.seconds, opts.quick, start, stop, free_port, ready,
                               TOOLS.get("nginx"))
    return wsbench.table(results, opts.seconds), wsbench.targets(results), \
        wsbench.as_json(results)


def ws_only(opts: argparse.Namespace) -> int:
    """`--ws-only`: the WebSocket rows alone, printed and written to latest-ws.json."""
    load_before = os.getloadavg()
    try:
        lines, checks, doc = ws_section(opts)
    finally:
        stop_all()
    load = (f"load average before: {load_before[0]:.2f}, after: {os.getloadavg()[0]:.2f} "
            f"({os.cpu_count()} CPUs)" + (" (--quick)" if opts.quick else ""))
    text = "\n".join([load, "", *lines, "", *[f"{verdict.split(' ')[0]:<5} {name}  "
                                    f"{verdict.partition(' ')[2]}" for name, verdict in checks]])
    print()
    print(text)
    path = Path(opts.out) / "latest-ws.json"
    path.write_text(json.dumps({"quick": opts.quick, "seconds": opts.seconds, "cpus":
                                os.cpu_count(), "websocket": doc, "report": text},
                               indent=2, default=str))
    drawn = chart([], path.with_suffix(".png"), "WebSocket rows only (--ws-only)", "", doc)
    print(f"\nwrote {path}" + (f" and {path.with_suffix('.png')}" if drawn else ""))
    return 0


# -- main -------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        description="dualproxy and the usual alternatives side by side (not part of CI)")
    parser.add_argument("--quick", action="store_true",
                        help="3 s loads and 16 MiB transfers, no 1 GiB memory check")
    parser.add_argument("--only", nargs="+", action="extend", default=[], metavar="NAME",
                        help=f"only contestants with this key ("
                             f"{', '.join(c.key for c in contestants('UPSTREAM'))}, and with "
                             "--baseline-tree dp-asgi-before, dp-wsgi-before) or name part")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"),
                        help="where latest.json and latest.png go")
    parser.add_argument("--seconds", type=int, default=None, help="small-GET load duration")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each download/upload; the median is reported")
    parser.add_argument("--stand-ins", action="store_true",
                        help="use the Python upstream, load generator and httpx even if "
                             "nginx, wrk and curl are installed (to test them)")
    parser.add_argument("--ws-only", action="store_true",
                        help="only the WebSocket rows (bench/wsbench.py)")
    parser.add_argument("--no-ws", action="store_true", help="no WebSocket rows")
    parser.add_argument("--baseline-tree", type=Path, default=None, metavar="DIR",
                        help="also run dualproxy from this checkout (dp-asgi-before, "
                             "dp-wsgi-before) and print after/before ratios")
    parser.add_argument("--no-docs", action="store_true",
                        help="do not copy the chart to docs/bench.png after a full run")
    parser.add_argument("--chart", type=Path, default=None, metavar="RESULTS.json",
                        help="measure nothing: draw the chart again from this results file "
                             "(latest.json) into --out/latest.png")
    opts = parser.parse_args()
    if opts.chart is not None:
        png = Path(opts.out) / "latest.png"
        if not chart_from_json(opts.chart, png):
            return 1
        print(f"wrote {png}")
        return 0
    if opts.stand_ins:
        TOOLS.clear()
    opts.seconds = opts.seconds or (3 if opts.quick else 8)
    opts.gib_check = not opts.quick
    big = 16 * MiB if opts.quick else 100 * MiB
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)

    atexit.register(stop_all)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    if opts.ws_only:
        return ws_only(opts)

    baseline = opts.baseline_tree.resolve() if opts.baseline_tree else None
    if baseline is not None and not (baseline / "dualproxy" / "__init__.py").is_file():
        parser.error(f"--baseline-tree {baseline}: no dualproxy package there")
    every = contestants("UPSTREAM", baseline)
    keys = {c.key for c in every}  # a key selects itself; other words match name parts
    chosen = [c for c in every
              if not opts.only or any(o == c.key if o in keys else o.lower() in c.name.lower()
                                      for o in opts.only)]
    if not chosen:
        parser.error(f"--only matches no contestant; keys: {', '.join(sorted(keys))}")
    work = Path(tempfile.mkdtemp(prefix="dualproxy-bench-"))
    sizes = {"small": 2, "16k": 16 * 1024, "big": big}
    if opts.gib_check and any(c.dualproxy and c.workers == 1 and not c.small_only
                              and c.paired is None for c in chosen):
        sizes["big1g"] = GiB
    print(f"work dir {work}; creating files {', '.join(sizes)}", flush=True)
    results: list[Result] = []
    ws_lines: list[str] = []
    ws_checks: list[tuple[str, str]] = []
    ws_doc: Any = []
    upstream: Upstream | None = None
    interrupted = False
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    load_before = os.getloadavg()
    try:
        upstream = Upstream(work, sizes)
        print(f"upstream: {upstream.kind} at {upstream.url}; sink check: {upstream.sink_check}")
        print(f"small GETs: {loadgen_name()} -d{opts.seconds}s; transfers: {transfer_name()}, "
              f"{big // MiB} MiB, median of {opts.repeat}", flush=True)
        for c in contestants(upstream.url, baseline, upstream.url2):
            if c.key not in {x.key for x in chosen}:
                continue
            print(f"-- {c.name}", flush=True)
            t0 = time.monotonic()
            result = (run_log_pair if c.paired else run_contestant)(c, upstream, work, opts)
            results.append(result)
            print(f"   {result.status}: {fmt(result.rps)} req/s, p99 "
                  f"{fmt(result.p99_ms, '.1f')} ms, down {fmt(result.down_mbs)} MB/s, up "
                  f"{fmt(result.up_mbs)} MB/s, chunked {result.chunked_up or '—'}, peak RSS "
                  f"{fmt(result.peak_rss_mb)} MB ({time.monotonic() - t0:.0f} s)", flush=True)
            for name, why in result.failures.items():
                print(f"   ! {name}: {why}", flush=True)
        if not opts.no_ws:
            ws_lines, ws_checks, ws_doc = ws_section(opts)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: stopping every process, reporting what was measured", flush=True)
    finally:
        stop_all()
        if upstream is not None:
            upstream.stop()
        shutil.rmtree(work, ignore_errors=True)
    if upstream is None:
        return 1

    by = {r.key: r for r in results}
    big_label = f"{big // MiB} MiB"
    header = [f"upstream: {upstream.kind} (sink check: {upstream.sink_check}); small GETs: "
              f"{loadgen_name()} -d{opts.seconds}s; transfers: {transfer_name()}, {big_label}, "
              f"median of {opts.repeat}"
              + (" (--quick)" if opts.quick else ""),
              f"load average before: {load_before[0]:.2f}, after: {os.getloadavg()[0]:.2f} "
              f"({os.cpu_count()} CPUs)", ""]
    ratio_lines, ratio_doc = ratios(by, big_label)
    checks = targets(by, opts.quick, big_label)
    if baseline is not None:
        ratio_lines += ["", *before_after(by, big_label)]
    text = "\n".join([*header, *main_table(results, big_label), "", *ratio_lines, "",
                      *ws_lines, "",
                      *[f"{verdict.split(' ')[0]:<5} {name}  {verdict.partition(' ')[2]}"
                        for name, verdict in [*checks, *ws_checks]]])
    print()
    print(text)
    doc = {"started": started, "quick": opts.quick, "interrupted": interrupted,
           "upstream": upstream.kind, "sink_check": upstream.sink_check, "loadgen": loadgen_name(),
           "transfer_tool": transfer_name(), "transfer_bytes": big, "seconds": opts.seconds,
           "cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after":
           os.getloadavg(), "results": [asdict(r) for r in results], "ratios": ratio_doc,
           "targets": [{"target": n, "verdict": v} for n, v in [*checks, *ws_checks]],
           "websocket": ws_doc, "report": text}
    json_path, png_path = out / "latest.json", out / "latest.png"
    json_path.write_text(json.dumps(doc, indent=2, allow_nan=False, default=str))
    tool = loadgen_name().split(" (")[0]
    drawn = chart(results, png_path, f"{started}, {upstream.kind}, {tool}, {big_label} transfers",
                  big_label, ws_doc)
    print(f"\nwrote {json_path}" + (f" and {png_path}" if drawn else ""))
    full = not (opts.quick or opts.only or interrupted or opts.no_docs)
    if drawn and full:
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copy(png_path, ROOT / "docs" / "bench.png")
        print(f"copied the chart to {ROOT / 'docs' / 'bench.png'}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
