"""Run alone by tests/test_interrupt.py (its name keeps it out of the suite's collection):
a test that starts a pairing's proxy and a plain helper process, writes their process
ids to $DUALPROXY_INTERRUPT_PIDS, then waits to be interrupted."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ProxyProcess


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (Linux /proc)."""
    found = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        children = (task / "children").read_text().split()
        for child in children:
            found += descendants(int(child))
    return found


def test_waits_to_be_interrupted(proxy: ProxyProcess) -> None:
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    pids = [*descendants(proxy.proc.pid), helper.pid]
    ready = Path(os.environ["DUALPROXY_INTERRUPT_PIDS"])
    ready.with_suffix(".tmp").write_text(" ".join(map(str, pids)))
    ready.with_suffix(".tmp").rename(ready)  # whole, or not there yet
    time.sleep(600)
