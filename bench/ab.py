"""An A/B of small-GET req/s: dualproxy from two (or more) trees, alternating rounds.

    python bench/ab.py --tree A --tree B [--rounds 5] [--seconds 5] [--path /small]
                       [-- SERVE ARGS]

On a shared machine one long run per tree measures the neighbours as much as the
proxy; alternating short wrk rounds (`wrk -t1 -c32`) against the same nginx
spreads the noise over every tree alike. Prints each round and the median a tree.
"""

from __future__ import annotations

import argparse
import atexit
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--path", default="/small")
    opts, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    atexit.register(run.stop_all)
    signal.signal(signal.SIGTERM, run._on_signal)
    work = Path(tempfile.mkdtemp(prefix="dualproxy-ab-"))
    upstream = run.Upstream(work, {"small": 2})
    ports = {}
    for i, tree in enumerate(opts.tree):
        port = run.free_port()
        proc = run.start([run.PY, "-m", "dualproxy", "serve", "--upstream", upstream.url, "--bind",
                      f"127.0.0.1:{port}", "--no-access-log", "--log-level", "warning", *extra],
                     env={"PYTHONPATH": str(tree.resolve())}, log=work / f"{i}.log",
                     cwd=tree.resolve())
        if not run.wait_http(f"http://127.0.0.1:{port}{opts.path}", proc=proc):
            raise SystemExit(f"{tree}: the proxy did not start")
        ports[i] = port
    rates: dict[int, list[float]] = {i: [] for i in ports}
    for r in range(opts.rounds):
        order = list(ports) if r % 2 == 0 else list(reversed(ports))
        for i in order:
            out = subprocess.run(["wrk", "-t1", "-c32", f"-d{opts.seconds}s",
                                  f"http://127.0.0.1:{ports[i]}{opts.path}"],
                                 capture_output=True, text=True).stdout
            rate = float(out.split("Requests/sec:")[1].split()[0])
            rates[i].append(rate)
            print(f"round {r + 1} {opts.tree[i]}: {rate:,.0f} req/s", flush=True)
    for i, tree in enumerate(opts.tree):
        print(f"{str(tree):40} median {statistics.median(rates[i]):8,.0f} req/s "
              f"({', '.join(f'{x:,.0f}' for x in rates[i])})")


if __name__ == "__main__":
    main()
