"""gunicorn settings for the example Flask app.

Threaded workers, so a long upload or download holds one thread, not a whole
worker. gunicorn would trust X-Forwarded-Proto from 127.0.0.1; the proxy
decides about forwarding headers itself, so that is switched off.
"""

import os

bind = os.environ.get("BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WORKERS", "1"))
worker_class = "gthread"
threads = 32
timeout = 60
keepalive = 5
forwarded_allow_ips = ""
secure_scheme_headers: dict[str, str] = {}
accesslog = None


def child_exit(server: object, worker: object) -> None:
    """A dead worker's live gauges (requests in flight) leave the metrics sum."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)  # type: ignore[attr-defined,no-untyped-call]
