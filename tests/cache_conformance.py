"""Run the HTTP cache conformance suite (tests/cache-tests, BSD-3-Clause: the suite
behind cache-tests.fyi) through `dualproxy serve --cache` on each pairing, print the
scores and fail under the thresholds. `nox -s cache_conformance` runs it; alone:

    python tests/cache_conformance.py [--pairings asgi-uvicorn,wsgi-gunicorn]
        [--required N] [--optimal N] [--out DIR]

Needs node (>= 18; nothing from npm but `undici` for the interim-response tests:
linked from npm's own copy when there is one, else installed with npm into
tests/cache-tests/node_modules, which git ignores).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

SUITE = Path(__file__).resolve().parent / "cache-tests"
SCORE = re.compile(r"required (\d+)/(\d+) optimal (\d+)/(\d+)")


def ensure_undici() -> None:
    """The interim-response tests import `undici`; node ships it only inside npm."""
    target = SUITE / "node_modules" / "undici"
    if target.exists():
        return
    target.parent.mkdir(exist_ok=True)
    npm = shutil.which("npm")
    if npm is None:
        print("cache-tests: no npm, the interim-response tests will fail", file=sys.stderr)
        return
    root = subprocess.run([npm, "root", "-g"], capture_output=True, text=True).stdout.strip()
    bundled = Path(root) / "npm" / "node_modules" / "undici"
    if bundled.is_dir():
        target.symlink_to(bundled)
        return
    subprocess.run([npm, "install", "--no-save", "--prefix", str(SUITE), "undici@6"],
                   check=False)


def run(pairing: str, out: Path) -> tuple[int, int, str]:
    adapter, server = pairing.split("-")
    results = out / f"cache-tests-{pairing}.json"
    command = [str(SUITE / "run.sh"), "--out", str(results), "--",
               sys.executable, "-m", "dualproxy", "serve", "--upstream", "{origin}",
               "--bind", "127.0.0.1:{port}", "--adapter", adapter, "--server", server,
               "--cache", "--no-access-log"]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    match = SCORE.search(done.stdout)
    if done.returncode != 0 or match is None:
        raise SystemExit(f"cache-tests on {pairing} did not run:\n{done.stdout}\n{done.stderr}")
    return int(match[1]), int(match[3]), done.stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairings", default="asgi-uvicorn,wsgi-gunicorn")
    parser.add_argument("--required", type=int, default=0, help="fail under this many")
    parser.add_argument("--optimal", type=int, default=0, help="fail under this many")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    ensure_undici()
    failed = False
    for pairing in args.pairings.split(","):
        required, optimal, line = run(pairing, args.out)
        verdict = "ok" if required >= args.required and optimal >= args.optimal else "LOW"
        failed |= verdict != "ok"
        print(f"{pairing}: required {required}/160 optimal {optimal}/105 "
              f"(thresholds {args.required}, {args.optimal}): {verdict}")
        print(f"  {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
