"""An A/B of 100 MiB transfers: dualproxy from several trees on several pairings, alternating.

    python bench/transfer_ab.py --tree A [--tree B] [--pairing asgi-granian ...]
                                [--rounds 5] [--mib 100] [--down] [--chunked]

bench/run.py measures each contestant once, one after another: on a shared machine
its upload column says as much about the neighbours as about the proxy. Here every
(tree, pairing) proxy runs at once in front of one nginx and each round sends one
curl upload (`-T`, Content-Length, or chunked) or download through each in turn,
after one straight to nginx (`direct`), so the noise falls on all alike. Printed per
proxy: the median MB/s, its ratio to the round's direct median, and the CPU time of
the proxy's whole process tree (every thread of every process, from
/proc/PID/task/TID/schedstat: user and kernel, granian's runtime threads included)
per 100 MiB, which depends much less on the machine's load than MB/s does.

`--alone granian|uvicorn` adds the server alone (`alone-SERVER`, run once, whatever
the trees): bench/static_upstream.py's ASGI sink on it, which reads the body and
drops it, in place of the proxy. No face can go faster on that server: a chunked
upload through granian alone is the ceiling of asgi-granian and wsgi-granian.
"""

from __future__ import annotations

import argparse
import atexit
import signal
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import run  # noqa: E402
from dualproxy.servers.granian import READ_BUFFER  # noqa: E402

PAIRINGS = ("asgi-uvicorn", "wsgi-gunicorn", "wsgi-uvicorn", "asgi-gunicorn", "asgi-granian",
            "wsgi-granian")
# The servers alone with the sink app, as `dualproxy serve` runs them (one worker,
# HTTP/1.1, uvicorn on uvloop and httptools, granian with dualproxy's read buffer).
ALONE = {
    "uvicorn": ["-m", "uvicorn", "--host", "127.0.0.1", "--port", "{port}", "--loop", "uvloop",
                "--http", "httptools", "--no-access-log", "--log-level", "warning",
                "bench.static_upstream:app"],
    "granian": ["-m", "granian", "--interface", "asginl", "--host", "127.0.0.1", "--port",
                "{port}", "--workers", "1", "--http", "1", "--no-ws", "--log-level", "warning",
                "--http1-buffer-size", "{read_buffer}", "bench.static_upstream:app"],
}


def tree_cpu_ns(root: int) -> int:
    """CPU nanoseconds so far of `root`, its threads and its descendants'."""
    total = 0
    for pid in run.tree_pids(root):
        for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
            try:
                total += int(stat.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue  # a thread that ended
    return total


def transfer(url: str, path: Path, opts: argparse.Namespace) -> float:
    """One curl transfer through `url`: MB/s (an error when it did not complete)."""
    size = opts.mib * run.MiB
    t = run.download(url + "/big", size) if opts.down else run.upload(
        url + "/sink", path, chunked=opts.chunked)
    if not t.ok:
        raise RuntimeError(f"{url}: {t.detail}")
    return t.mbs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", type=Path, required=True,
                        help="a dualproxy checkout; repeatable")
    parser.add_argument("--pairing", action="append", choices=PAIRINGS,
                        help="face-server; repeatable (default: all six)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mib", type=int, default=100)
    parser.add_argument("--down", action="store_true", help="downloads instead of uploads")
    parser.add_argument("--chunked", action="store_true", help="uploads without Content-Length")
    parser.add_argument("--alone", action="append", choices=ALONE, default=[],
                        help="add this server alone with a sink app (the ceiling); repeatable")
    opts = parser.parse_args()
    atexit.register(run.stop_all)
    signal.signal(signal.SIGTERM, run._on_signal)
    work = Path(tempfile.mkdtemp(prefix="dualproxy-transfer-ab-"))
    upstream = run.Upstream(work, {"small": 2, "big": opts.mib * run.MiB})
    big = upstream.path("big")
    proxies: dict[tuple[Path, str], tuple[str, int]] = {}
    try:
        for tree in (t.resolve() for t in opts.tree):
            for pairing in opts.pairing or PAIRINGS:
                face, server = pairing.split("-")
                port = run.free_port()
                proc = run.start([run.PY, "-m", "dualproxy", "serve", "--upstream", upstream.url,
                                  "--bind", f"127.0.0.1:{port}", "--no-access-log",
                                  "--log-level", "warning", "--adapter", face, "--server", server],
                                 env={"PYTHONPATH": str(tree)},
                                 log=work / f"{tree.name}-{pairing}.log", cwd=tree)
                if not run.wait_http(f"http://127.0.0.1:{port}/small", timeout=60, proc=proc):
                    raise SystemExit(f"{tree} {pairing}: the proxy did not start")
                proxies[tree, pairing] = (f"http://127.0.0.1:{port}", proc.pid)
        for server in opts.alone:
            port = run.free_port()
            args = [a.format(port=port, read_buffer=READ_BUFFER) for a in ALONE[server]]
            proc = run.start([run.PY, *args], env={"BENCH_WWW": str(big.parent)},
                             log=work / f"alone-{server}.log", cwd=ROOT)
            if not run.wait_http(f"http://127.0.0.1:{port}/small", timeout=60, proc=proc):
                raise SystemExit(f"{server} alone did not start")
            proxies[ROOT, f"alone-{server}"] = (f"http://127.0.0.1:{port}", proc.pid)
        direct: list[float] = []
        speeds: dict[tuple[Path, str], list[float]] = {key: [] for key in proxies}
        cpu: dict[tuple[Path, str], list[float]] = {key: [] for key in proxies}
        for r in range(opts.rounds):
            direct.append(transfer(upstream.url, big, opts))
            keys = list(proxies) if r % 2 == 0 else list(reversed(proxies))
            for key in keys:
                url, pid = proxies[key]
                before = tree_cpu_ns(pid)
                speeds[key].append(transfer(url, big, opts))
                cpu[key].append((tree_cpu_ns(pid) - before) / 1e6 * 100 / opts.mib)
            print(f"round {r + 1}: direct {direct[-1]:,.0f} MB/s, "
                  + ", ".join(f"{p} {k.name} {speeds[k, p][-1]:,.0f}" for k, p in keys),
                  flush=True)
        base = statistics.median(direct)
        kind = "download" if opts.down else "chunked upload" if opts.chunked else "upload"
        print(f"\n{opts.mib} MiB {kind}, median of {opts.rounds}: direct {base:,.0f} MB/s "
              f"({', '.join(f'{x:,.0f}' for x in direct)})")
        for (tree, pairing), values in speeds.items():
            mbs = statistics.median(values)
            where = "-" if pairing.startswith("alone-") else str(tree)[-30:]
            print(f"{pairing:14} {where:30} {mbs:7,.0f} MB/s {mbs / base:5.0%} of "
                  f"direct, CPU {statistics.median(cpu[tree, pairing]):5.0f} ms/100 MiB "
                  f"({', '.join(f'{x:,.0f}' for x in values)})")
    finally:
        upstream.stop()


if __name__ == "__main__":
    main()
