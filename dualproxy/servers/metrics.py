"""`dualproxy serve --metrics-bind`: the metrics listener, prometheus_client's multiprocess mode.

The listener is a small stdlib HTTP server on a thread of the main process
(gunicorn's arbiter, uvicorn's supervisor, or the one process there is), never
on the proxied port: `GET /metrics` is the exposition, `GET /healthz` a cheap
200 "ok" for a container health check or a Kubernetes probe.

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
import shutil
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ENV_DIR = "PROMETHEUS_MULTIPROC_DIR"
METRICS_PATH = "/metrics"
HEALTH_PATH = "/healthz"
# prometheus_client's file for a worker's live gauges: gauge_livesum_<pid>.db
_LIVE_FILE = re.compile(r"gauge_live[a-z]+_(\d+)\.db")


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
            self.server = ThreadingHTTPServer((host, port), _handler(self))
        except OSError:
            self._remove_directory()
            raise
        self.server.daemon_threads = True
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
