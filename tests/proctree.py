"""A process tree from /proc (Linux): its pids, memory, descriptors and threads.

For checks that a proxy (a `dualproxy serve` and the workers below it) gave back what it
took: bench/soak.py and the fault harness (tests/chaos).
"""

from __future__ import annotations

import collections
import os


def tree_pids(root: int) -> list[int]:
    """`root` and every process below it."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children[ppid].append(int(entry))
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, ()))
    return pids


def _status_total(root: int, key: str) -> int:
    """The sum over the tree of one /proc/PID/status field (`VmRSS:` in kB, `Threads:`)."""
    total = 0
    for pid in tree_pids(root):
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith(key))
        except (OSError, StopIteration):
            pass
    return total


def rss_mb(root: int) -> float:
    """Resident memory of the tree, MiB."""
    return _status_total(root, "VmRSS:") / 1024


def open_fds(root: int) -> int:
    """Open file descriptors of the tree."""
    total = 0
    for pid in tree_pids(root):
        try:
            total += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            pass
    return total


def thread_count(root: int) -> int:
    """Threads of the tree."""
    return _status_total(root, "Threads:")
