"""gunicorn as `dualproxy serve` runs it: threaded workers for wsgi, uvicorn's for asgi."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ..drain import SLACK
from .limits import FIELD_SIZE_LIMIT, FIELDS_LIMIT, REQUEST_LINE_LIMIT

# The worker classes: uvicorn's for the asgi face (servers/worker.py), gunicorn's
# threaded one starting the drain clock for wsgi (servers/gthread.py).
UVICORN_WORKER = "dualproxy.servers.worker.UvicornWorker"
THREAD_WORKER = "dualproxy.servers.gthread.ThreadWorker"


def gunicorn_settings() -> dict[str, Any]:
    """The setting names this gunicorn knows."""
    from gunicorn.config import KNOWN_SETTINGS

    return {setting.name: setting for setting in KNOWN_SETTINGS}


def serve_gunicorn(load: Callable[[], Any], *, adapter: str, host: str, port: int,
                   workers: int, threads: int, log_level: str,
                   graceful_timeout: float, certfile: str | None = None,
                   keyfile: str | None = None,
                   child_exit: Callable[[Any, Any], None] | None = None) -> None:
    """Run gunicorn; each worker process calls `load()` for its app after the fork.

    `certfile`/`keyfile`: serve HTTPS, in gthread workers (wsgi.url_scheme https)
    and uvicorn workers (scope scheme https) alike. `child_exit(arbiter, worker)`
    runs in the arbiter after a worker exited.
    """
    from gunicorn.app.base import BaseApplication
    from gunicorn.arbiter import Arbiter

    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    settings: dict[str, Any] = {
        "bind": [bind],
        "workers": workers,
        "loglevel": log_level,
        "accesslog": None,
        # Whole seconds, and SLACK beyond the drain clock's deadline (drain.py).
        "graceful_timeout": math.ceil(graceful_timeout + SLACK),
        # gunicorn would trust X-Forwarded-Proto from 127.0.0.1 for wsgi.url_scheme.
        "forwarded_allow_ips": "",
        "secure_scheme_headers": {},
        # The core's own limits (servers/limits.py): gunicorn's parser is quadratic in
        # the head's size, so it must not read past them; it answers 414/431 itself.
        "limit_request_line": REQUEST_LINE_LIMIT,
        "limit_request_fields": FIELDS_LIMIT,
        "limit_request_field_size": FIELD_SIZE_LIMIT,
    }
    if "control_socket_disable" in gunicorn_settings():
        # gunicorn >= 25.1 opens a control socket at one per-user path
        # ($XDG_RUNTIME_DIR/gunicorn.ctl): two proxies on one machine would take
        # it from each other. `dualproxy serve` offers no gunicornc management.
        settings["control_socket_disable"] = True
    if certfile is not None:
        settings.update(certfile=certfile, keyfile=keyfile)
    if child_exit is not None:
        settings["child_exit"] = child_exit
    if adapter == "wsgi":
        settings.update(worker_class=THREAD_WORKER, threads=threads, timeout=60, keepalive=5)
    else:
        settings.update(worker_class=UVICORN_WORKER, timeout=60)

    class DrainingArbiter(Arbiter):  # type: ignore[misc]
        def handle_int(self) -> None:
            """One SIGINT drains like SIGTERM (gunicorn's own stops at once); a second
            one during the drain is gunicorn's quick stop (Arbiter.stop watches for it)."""
            raise StopIteration

    class Application(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            for key, value in settings.items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            return load()

        def run(self) -> None:
            DrainingArbiter(self).run()

    Application().run()
