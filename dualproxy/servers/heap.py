"""Process-wide memory settings for the worker processes `dualproxy serve` starts."""

from __future__ import annotations

import ctypes
import gc
import threading
import time


def freeze_heap() -> None:
    """Exempt everything loaded so far from the cyclic garbage collector.

    A full collection otherwise walks every object of the loaded modules
    (uvicorn, httpx, ...), pausing the process for 15-30 ms several times a
    second under load: the proxy's worst latencies. Called once the app is built.
    """
    gc.collect()
    gc.freeze()


# glibc mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# A body piece's buffers (a socket read, a joined piece) below this size come from
# the heap, not from a mmap of their own each.
MMAP_THRESHOLD = 2 << 20
# Free memory at the top of the heap handed back to the kernel only past this much.
TRIM_THRESHOLD = 4 << 20


def keep_body_buffers() -> None:
    """Let a streaming body's buffers be reused instead of given back to the kernel
    and faulted in again for every piece (glibc only).

    glibc trims the heap's top once more than its trim threshold is free there;
    by default that threshold is twice a dynamic mmap threshold, which grows to
    the largest mmapped block freed so far. So it depends on the process's
    history: in some processes (a fresh uvicorn that served only uploads) it
    settled near 1 MiB, and a body streaming through in 256-512 KiB pieces
    trimmed and regrew the heap at nearly every piece (~500 brk() calls per
    100 MiB, every page zeroed and faulted in again). Measured on the ASGI face
    on uvicorn: 126 ms of CPU per 100 MiB uploaded in such a process, 66 in one
    that had served downloads first; 5 uploads with the trim threshold forced to
    1 MiB took 143k page faults and 796 ms, at 8 MiB 558 and 312 ms. Fixed
    thresholds keep up to TRIM_THRESHOLD of freed heap for the next pieces (the
    wsgi face's periodic malloc_trim still returns it when idle); blocks up to
    MMAP_THRESHOLD come from the heap.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return  # not glibc
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)


def trim_heap_periodically(interval: float = 1.0) -> None:
    """Hand memory freed by the wsgi face's threads back to the OS (glibc only).

    glibc gives each thread a malloc arena of its own and does not return the
    pages of body buffers freed in the middle of those arenas: under the wsgi
    face's thread pool the RSS crept up ~30% over 50k mixed requests with no
    live object behind it (`nox -s soak`). malloc_trim(0) returns them; it runs
    outside the GIL and takes well under a millisecond, once every `interval`.
    """
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return  # not glibc (musl, macOS): nothing to trim
    trim.argtypes = [ctypes.c_size_t]

    def loop() -> None:
        while True:
            time.sleep(interval)
            trim(0)

    threading.Thread(target=loop, name="dualproxy-heap-trim", daemon=True).start()
