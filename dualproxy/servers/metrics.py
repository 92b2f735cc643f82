"""`dualproxy serve --metrics-bind`: the metrics listener, prometheus_client's multiprocess mode.

The listener is a small stdlib HTTP server on a thread of the main process
(gunicorn's arbiter, uvicorn's supervisor, or the one process there is), never
on the proxied port: `GET /metrics` is the exposition, `GET /healthz` a cheap
200 "ok" for a container health check or a Kubernetes probe.

It may be bound to 0.0.0.0 (the Dockerfile does), so what a client can hold is
bounded: a connection costs no thread until its request starts to arrive (one
selector thread watches the idle ones, at most MAX_IDLE of them, each closed
after IDLE_TIMEOUT), at most HANDLERS threads read and answer requests, and a
request must arrive within READ_TIMEOUT. A scrape is one short connection.

With worker processes (gunicorn, or uvicorn's `--workers N`) each worker keeps
its values in prometheus_client's multiprocess files, in a private temporary
directory made here before any worker exists (PROMETHEUS_MULTIPROC_DIR must be
set before prometheus_client is imported) and removed on exit; the listener
sums them. A dead worker's live gauges (in flight, WebSocket sessions) are
dropped: gunicorn calls `child_exit`; uvicorn's supervisor has no such hook, so
each scrape first drops the files of processes that no longer exist.
"""

from __future__ import annotations

import os
import re
import selectors
import shutil
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

ENV_DIR = "PROMETHEUS_MULTIPROC_DIR"
METRICS_PATH = "/metrics"
HEALTH_PATH = "/healthz"
# prometheus_client's file for a worker's live gauges: gauge_livesum_<pid>.db
_LIVE_FILE = re.compile(r"gauge_live[a-z]+_(\d+)\.db")

# The metrics listener's bounds (see the module docstring).
HANDLERS = 4          # threads answering requests
MAX_IDLE = 64         # connections waiting for their first byte; the oldest goes first
IDLE_TIMEOUT = 10.0   # seconds a connection may stay silent before it is closed
READ_TIMEOUT = 5.0    # seconds for each read of a request once it started


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class MetricsListener:
    """The /metrics and /healthz server of one `dualproxy serve`; `close()` ends it."""

    def __init__(self, host: str, port: int, *, multiprocess: bool) -> None:
        self.owner = os.getpid()  # forked gunicorn workers inherit this object: not theirs
        self.directory: Path | None = None
        if multiprocess:
            self.directory = Path(tempfile.mkdtemp(prefix="dualproxy-metrics-"))
            os.environ[ENV_DIR] = str(self.directory)
        else:  # one process: a variable left in the environment must not switch modes
            os.environ.pop(ENV_DIR, None)
        from prometheus_client import REGISTRY, CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        self.registry = REGISTRY
        if self.directory is not None:
            self.registry = CollectorRegistry()
            MultiProcessCollector(self.registry,  # type: ignore[no-untyped-call]
                                  path=str(self.directory))
        try:
            self.server = _BoundedServer((host, port), _handler(self))
        except OSError:
            self._remove_directory()
            raise
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       name="dualproxy-metrics", daemon=True)
        self.thread.start()

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        self.sweep_dead()
        return generate_latest(self.registry)

    def sweep_dead(self) -> None:
        """Drop the live-gauge files of worker processes that have exited."""
        if self.directory is None:
            return
        for path in self.directory.glob("gauge_live*.db"):
            match = _LIVE_FILE.fullmatch(path.name)
            if match is not None and not _alive(int(match[1])):
                self.mark_dead(int(match[1]))

    def child_exit(self, server: Any, worker: Any) -> None:
        """gunicorn's `child_exit` hook (in the arbiter): the worker's live gauges go."""
        self.mark_dead(worker.pid)

    def mark_dead(self, pid: int) -> None:
        if self.directory is not None:
            from prometheus_client.multiprocess import mark_process_dead

            mark_process_dead(pid, str(self.directory))  # type: ignore[no-untyped-call]

    def close(self) -> None:
        if os.getpid() != self.owner:
            return  # a gunicorn worker unwinding through `dualproxy serve` on its exit
        self.server.shutdown()
        self.server.server_close()
        self._remove_directory()

    def _remove_directory(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            if os.environ.get(ENV_DIR) == str(self.directory):
                del os.environ[ENV_DIR]


class _BoundedServer(HTTPServer):
    """An HTTP server whose idle connections wait in a selector, not in threads, and
    whose requests are answered by HANDLERS threads (the module docstring's bounds)."""

    request_queue_size = 128  # socketserver's 5 would leave a burst of scrapers waiting

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]
                 ) -> None:
        # Made before binding: a bind that fails calls server_close().
        self._idle: dict[socket.socket, tuple[Any, float]] = {}  # -> (address, deadline)
        self._busy = threading.BoundedSemaphore(HANDLERS)
        self._pool = ThreadPoolExecutor(HANDLERS, thread_name_prefix="dualproxy-metrics")
        self._selector = selectors.DefaultSelector()
        self._stop_r, self._stop_w = socket.socketpair()
        self._stopped = threading.Event()
        super().__init__(address, handler)

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        selector = self._selector
        self.socket.setblocking(False)
        selector.register(self.socket, selectors.EVENT_READ, "accept")
        selector.register(self._stop_r, selectors.EVENT_READ, "stop")
        try:
            while True:
                for key, _ in selector.select(self._next_expiry()):
                    if key.data == "stop":
                        self._close_idle()
                        return
                    if key.data == "accept":
                        self._accept()
                    else:
                        self._readable(key.fileobj)  # type: ignore[arg-type]
                self._expire()
        finally:
            self._stopped.set()

    def _accept(self) -> None:
        try:
            conn, address = self.socket.accept()
        except OSError:
            return
        if len(self._idle) >= MAX_IDLE:
            self._drop(next(iter(self._idle)))  # the oldest idle one makes room
        self._idle[conn] = (address, time.monotonic() + IDLE_TIMEOUT)
        self._selector.register(conn, selectors.EVENT_READ, "conn")

    def _readable(self, conn: socket.socket) -> None:
        address, _ = self._idle.pop(conn)
        self._selector.unregister(conn)
        if not self._busy.acquire(blocking=False):
            self._close(conn)  # every handler is busy: the client may retry
            return
        conn.settimeout(READ_TIMEOUT)
        self._pool.submit(self._answer, conn, address)

    def _answer(self, conn: socket.socket, address: Any) -> None:
        try:
            self.finish_request(conn, address)
        except Exception:  # a client that broke off or timed out: nothing to answer
            pass
        finally:
            self.shutdown_request(conn)
            self._busy.release()

    def _next_expiry(self) -> float | None:
        if not self._idle:
            return None
        _, deadline = next(iter(self._idle.values()))
        return max(0.0, deadline - time.monotonic())

    def _expire(self) -> None:
        now = time.monotonic()
        while self._idle:
            conn, (_, deadline) = next(iter(self._idle.items()))
            if deadline > now:
                return
            self._drop(conn)

    def _drop(self, conn: socket.socket) -> None:
        del self._idle[conn]
        self._selector.unregister(conn)
        self._close(conn)

    def _close_idle(self) -> None:
        while self._idle:
            self._drop(next(iter(self._idle)))

    @staticmethod
    def _close(conn: socket.socket) -> None:
        try:
            conn.close()
        except OSError:
            pass

    def shutdown(self) -> None:
        self._stop_w.send(b"x")
        self._stopped.wait(5)
        self._pool.shutdown(wait=False)

    def server_close(self) -> None:
        super().server_close()
        self._selector.close()
        self._stop_r.close()
        self._stop_w.close()


def _handler(listener: MetricsListener) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "dualproxy-metrics"

        def do_GET(self) -> None:
            path = self.path.partition("?")[0]
            if path == METRICS_PATH:
                from prometheus_client import CONTENT_TYPE_LATEST

                self._answer(200, CONTENT_TYPE_LATEST, listener.exposition())
            elif path == HEALTH_PATH:
                self._answer(200, "text/plain; charset=utf-8", b"ok\n")
            else:
                self._answer(404, "text/plain; charset=utf-8", b"not found\n")

        def do_HEAD(self) -> None:
            self.do_GET()

        def _answer(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # scrapes every few seconds would drown the access log

    return Handler


def start_metrics_listener(bind: tuple[str, int] | None, *, multiprocess: bool
                           ) -> MetricsListener | None:
    """The running listener for `--metrics-bind` (None without the flag); OSError when
    the address cannot be bound."""
    return None if bind is None else MetricsListener(*bind, multiprocess=multiprocess)
