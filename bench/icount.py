"""Instructions per request: dualproxy under valgrind's callgrind, a deterministic cost.

    python bench/icount.py [--tree DIR ...] [--requests 2000] [--conns 8]
                           [--download-mib 100] [--adapter asgi|wsgi] [-- SERVE ARGS]

Wall-clock figures drift on a shared machine; an instruction count does not (within
about a percent). For each tree (a dualproxy checkout, default this one) it starts
`python -m dualproxy serve` from that tree under `valgrind --tool=callgrind` in front
of nginx (bench/run.py's upstream), warms it up, zeroes the counters, sends
`--requests` small GETs over `--conns` keep-alive connections, dumps the counters
(instructions of the whole proxy process: the server, the proxy, the event loop;
of its worker process where the server runs the app in one, as granian does),
then the same around one download of `--download-mib` MiB (curl). Prints
instructions per request and per MiB, one row a tree. Extra `serve` arguments
after `--` (say `--compress`) apply to every tree.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.run import (  # noqa: E402
    PY,
    MiB,
    Upstream,
    _on_signal,
    free_port,
    start,
    stop,
    stop_all,
    wait_http,
)


async def _one_connection(port: int, count: int, path: str) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    try:
        for _ in range(count):
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"unexpected answer: {head[:200]!r}")
            length = None
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length is None:
                raise RuntimeError(f"no Content-Length: {head!r}")
            await reader.readexactly(length)
    finally:
        writer.close()


async def small_gets(port: int, total: int, conns: int, path: str = "/small") -> None:
    share, extra = divmod(total, conns)
    await asyncio.gather(*(_one_connection(port, share + (i < extra), path)
                           for i in range(conns)))


def descendants(pid: int) -> list[int]:
    """The processes below `pid` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def serving_pid(pid: int, action: object) -> int:
    """Of `pid` and the processes below it, the one that worked most during `action()`:
    the server's worker (granian runs the app in a process it starts; gunicorn too)."""
    def cpu(p: int) -> float:
        try:
            return cpu_seconds(p)
        except OSError:
            return 0.0

    pids = [pid, *descendants(pid)]
    before = {p: cpu(p) for p in pids}
    action()  # type: ignore[operator]
    return max(pids, key=lambda p: cpu(p) - before[p])


def counted(pid: int, out: Path, action: object) -> int:
    """Instructions the process `pid` ran during `action()` (callgrind_control); `out`
    is its callgrind output file (`%p` in it stands for the pid)."""
    out = Path(str(out).replace("%p", str(pid)))
    subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True)
    # The command may be served a moment later (when the process next wakes): a
    # window started at once would lose its first requests. Idle costs ~0.2M a second.
    time.sleep(2)
    before = set(out.parent.glob(out.name + "*"))
    action()  # type: ignore[operator]
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
    for _ in range(100):
        new = sorted(set(out.parent.glob(out.name + "*")) - before)
        if new:
            for line in new[-1].read_text(errors="replace").splitlines():
                if line.startswith(("totals:", "summary:")):
                    return int(line.split()[1])
        time.sleep(0.1)
    raise RuntimeError("no callgrind dump")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of the process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_cpu(tree: Path, upstream: Upstream, opts: argparse.Namespace,
                extra: list[str], work: Path) -> list[float]:
    """CPU microseconds (user + system) a request, natively: three windows."""
    port = free_port()
    serve = [PY, "-m", "dualproxy", "serve", "--upstream", upstream.url, "--bind",
             f"127.0.0.1:{port}", "--no-access-log", "--log-level", "warning",
             "--adapter", opts.adapter, *extra]
    proc = start(serve, env={"PYTHONPATH": str(tree)}, log=work / f"{tree.name}.{port}.log",
                 cwd=tree)
    try:
        if not wait_http(f"http://127.0.0.1:{port}/small", timeout=60, proc=proc):
            raise RuntimeError(f"{tree}: the proxy did not start")
        pid = serving_pid(proc.pid, lambda: asyncio.run(
            small_gets(port, opts.warmup, opts.conns, opts.path)))
        windows = []
        for _ in range(3):
            before = cpu_seconds(pid)
            asyncio.run(small_gets(port, opts.requests, opts.conns, opts.path))
            windows.append((cpu_seconds(pid) - before) / opts.requests * 1e6)
        return windows
    finally:
        stop(proc)


def measure(tree: Path, upstream: Upstream, opts: argparse.Namespace,
            extra: list[str], work: Path) -> tuple[float, float | None]:
    port = free_port()
    out = work / f"cg.{tree.name}.{port}.%p"  # a file per process: granian forks its worker
    serve = ([PY, "-m", "dualproxy", "serve", "--upstream", upstream.url, "--bind",
              f"127.0.0.1:{port}", "--no-access-log", "--log-level", "warning",
              "--adapter", opts.adapter, *extra] if opts.app is None else
             [PY, "-m", "uvicorn", "--port", str(port), "--loop", "uvloop", "--http",
              "httptools", "--no-access-log", "--log-level", "warning", opts.app])
    # --trace-children: a worker started by exec (multiprocessing's spawn) is counted too.
    cmd = ["valgrind", "--tool=callgrind", "--trace-children=yes",
           f"--callgrind-out-file={out}", *serve]
    log = work / f"{tree.name}.{port}.log"
    proc = start(cmd, env={"PYTHONPATH": str(tree)}, log=log,
                 cwd=tree if opts.app is None else ROOT)  # `-m`: the cwd comes first on sys.path
    try:
        if not wait_http(f"http://127.0.0.1:{port}/small", timeout=300, proc=proc):
            raise RuntimeError(f"{tree}: the proxy did not start (see {log})")
        # The process that serves (granian's and gunicorn's worker, not their main process).
        pid = serving_pid(proc.pid, lambda: asyncio.run(
            small_gets(port, opts.warmup, opts.conns, opts.path)))
        if pid != proc.pid:
            print(f"  counting the worker process {pid}", flush=True)
        if opts.idle:
            idle = counted(pid, out, lambda: time.sleep(opts.idle))
            print(f"  idle: {idle / opts.idle:,.0f} instructions/s", flush=True)
        # Three windows, the largest: a window whose zeroing was served late (vgdb
        # reaches a busy valgrind when it can) lost its first requests; a late dump only
        # adds idle time (~0.2M instructions a second). Full windows agree within 0.1%.
        smalls = sorted(counted(pid, out, lambda: asyncio.run(
            small_gets(port, opts.requests, opts.conns, opts.path))) for _ in range(3))
        print("  windows: " + ", ".join(f"{s / opts.requests:,.0f}" for s in smalls),
              flush=True)
        small = smalls[-1]
        per_mib = None
        if opts.download_mib and opts.app is None:
            def download() -> None:
                result = subprocess.run(
                    ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
                     f"http://127.0.0.1:{port}/big"], capture_output=True, text=True,
                    timeout=1800).stdout.split()
                if result != ["200", str(opts.download_mib * MiB)]:
                    raise RuntimeError(f"download failed: {result}")
            per_mib = counted(pid, out, download) / opts.download_mib
        return small / opts.requests, per_mib
    finally:
        stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", type=Path,
                        help="a dualproxy checkout (default: this one); repeatable")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--conns", type=int, default=8)
    parser.add_argument("--download-mib", type=int, default=100, help="0: no download")
    parser.add_argument("--adapter", choices=("asgi", "wsgi"), default="asgi")
    parser.add_argument("--path", default="/small", help="what the small GETs ask for "
                        "(/cached/small: Cache-Control max-age=3600, the cache rows' file)")
    parser.add_argument("--idle", type=float, default=0,
                        help="also count this many seconds without requests")
    parser.add_argument("--app", help="an ASGI app (module:attr) on uvicorn instead of "
                        "dualproxy: the server's own cost (bench.contestants.hello:asgi)")
    parser.add_argument("--cpu", action="store_true",
                        help="no valgrind: CPU time (user + system) a request, natively")
    parser.add_argument("--repeat", type=int, default=1, help="runs per tree")
    opts, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    trees = [t.resolve() for t in (opts.tree or [ROOT])]
    atexit.register(stop_all)
    signal.signal(signal.SIGTERM, _on_signal)
    work = Path(tempfile.mkdtemp(prefix="dualproxy-icount-"))
    upstream = Upstream(work, {"small": 2, "big": max(opts.download_mib, 1) * MiB})
    try:
        if opts.cpu:
            print(f"{'tree':40} CPU us/request (user+system; three windows)", flush=True)
            for _ in range(opts.repeat):
                for tree in trees:
                    windows = measure_cpu(tree, upstream, opts, extra, work)
                    print(f"{str(tree)[-40:]:40} {sorted(windows)[1]:8.1f} "
                          f"({', '.join(f'{w:.1f}' for w in windows)})", flush=True)
            return
        print(f"{'tree':40} {'instr/request':>14} {'instr/MiB':>14}", flush=True)
        for _ in range(opts.repeat):
            for tree in trees:
                per_request, per_mib = measure(tree, upstream, opts, extra, work)
                mib = f"{per_mib:14,.0f}" if per_mib is not None else f"{'-':>14}"
                print(f"{str(tree)[-40:]:40} {per_request:14,.0f} {mib}", flush=True)
    finally:
        upstream.stop()


if __name__ == "__main__":
    main()
