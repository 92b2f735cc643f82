"""Run parts of the suite as separate pytest processes, a few at a time.

`python -m tests.parallel --jobs 2 asgi-uvicorn wsgi-gunicorn ... unit`: each
name is a face x server pairing (its behaviour tests, as `nox -s "tests(P)"`
runs them), `unit` (the tests that take no pairing) or a nox session named
`versions-3.X` (the version-sensitive tests on another Python, run by nox). Most of a pairing's time
is spent waiting on sockets, servers starting and timeouts running out, so two
at once on two cores take about half the time of one after the other. Each part
writes to its own log, printed whole when the part fails, as a summary line when
it passes; the exit status is non-zero if any part failed.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def command(part: str, pytest_args: list[str]) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ)
    if part.startswith("versions-"):
        # Another Python's session (its own virtualenv): nox makes it, beside the others.
        more = ["--", *pytest_args] if pytest_args else []
        return [sys.executable, "-m", "nox", "-s", part, *more], env
    if part == "unit":
        env["DUALPROXY_SUITE_PART"] = "unit"
    else:
        env.update(DUALPROXY_PAIRINGS=part, DUALPROXY_SUITE_PART="pairings")
    return [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *pytest_args], env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.parallel", description=__doc__)
    parser.add_argument("parts", nargs="+", help="pairings (asgi-uvicorn, ...) or unit")
    parser.add_argument("--jobs", type=int, default=2, help="parts at once (default: 2)")
    parser.add_argument("--pytest", default="", help="more pytest options, one string")
    args = parser.parse_args(argv)
    logs = Path(tempfile.mkdtemp(prefix="dualproxy-parts-"))
    waiting = list(args.parts)
    running: dict[str, tuple[subprocess.Popen[bytes], float]] = {}
    failed: list[str] = []
    # A stop of this runner (nox interrupted, CI cancelled) stops every part it started.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return _run(args, logs, waiting, running, failed)
    finally:
        for proc, _ in running.values():
            proc.terminate()
        for proc, _ in running.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _run(args: argparse.Namespace, logs: Path, waiting: list[str],
         running: dict[str, tuple[subprocess.Popen[bytes], float]], failed: list[str]) -> int:
    while waiting or running:
        while waiting and len(running) < args.jobs:
            part = waiting.pop(0)
            cmd, env = command(part, args.pytest.split())
            with (logs / f"{part}.log").open("wb") as log:
                running[part] = (subprocess.Popen(cmd, env=env, stdout=log,
                                                  stderr=subprocess.STDOUT), time.monotonic())
            print(f"[{part}] started: {' '.join(cmd[1:])}", flush=True)
        time.sleep(0.5)
        for part, (proc, started) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[part]
            text = (logs / f"{part}.log").read_text(errors="replace")
            took = time.monotonic() - started
            summary = text.strip().splitlines()[-1] if text.strip() else "(no output)"
            if proc.returncode == 0:
                print(f"[{part}] passed in {took:.0f} s: {summary}", flush=True)
            else:
                failed.append(part)
                print(f"[{part}] FAILED (exit {proc.returncode}) in {took:.0f} s; its log:\n"
                      f"{text}\n[{part}] FAILED: {summary}", flush=True)
    if failed:
        print(f"failed parts: {', '.join(failed)}", flush=True)
        return 1
    print(f"all {len(args.parts)} parts passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
