"""Interrupting the suite leaves nothing behind: no process a test started, no log file.

A small pytest run (tests/interrupt_target.py) starts a proxy of the pairing and a helper
process, then gets SIGINT (Ctrl-C), SIGTERM (nox's second step, a CI timeout) or SIGKILL
(nox's last); every process it started must end and no `dualproxy-*.log` may remain in
its temporary directory. Linux: it reads /proc, as the death signal it proves is Linux's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.rawhttp import wait_until


def alive(pid: int) -> bool:
    """Running, and not a zombie waiting for a parent to reap it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL],
                         ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_an_interrupted_run_leaves_nothing(pairing: str, signum: int, tmp_path: Path) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    ready = tmp_path / "pids"
    env = {**os.environ, "TMPDIR": str(temp), "DUALPROXY_INTERRUPT_PIDS": str(ready)}
    env.pop("DUALPROXY_PAIRINGS", None)
    run = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
         "tests/interrupt_target.py", "--pairing", pairing],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert wait_until(lambda: ready.exists() or run.poll() is not None, timeout=60)
        assert ready.exists(), run.communicate()[0].decode(errors="replace")
        pids = [int(pid) for pid in ready.read_text().split()]
        assert len(pids) >= 2 and all(alive(pid) for pid in pids)
        run.send_signal(signum)
        output = run.communicate(timeout=60)[0].decode(errors="replace")
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert wait_until(lambda: not any(alive(pid) for pid in pids), timeout=30), (
        [pid for pid in pids if alive(pid)], output)
    assert list(temp.glob("**/dualproxy-*")) == [], output
