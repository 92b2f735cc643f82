"""gunicorn as `dualproxy serve` runs it: threaded workers for wsgi, uvicorn's for asgi."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

# The worker class for the asgi face (see servers/worker.py).
UVICORN_WORKER = "dualproxy.servers.worker.UvicornWorker"


def gunicorn_settings() -> dict[str, Any]:
    """The setting names this gunicorn knows."""
    from gunicorn.config import KNOWN_SETTINGS

    return {setting.name: setting for setting in KNOWN_SETTINGS}


def serve_gunicorn(load: Callable[[], Any], *, adapter: str, host: str, port: int,
                   workers: int, threads: int, log_level: str,
                   graceful_timeout: float, certfile: str | None = None,
                   keyfile: str | None = None) -> None:
    """Run gunicorn; each worker process calls `load()` for its app after the fork.

    `certfile`/`keyfile`: serve HTTPS, in gthread workers (wsgi.url_scheme https)
    and uvicorn workers (scope scheme https) alike.
    """
    from gunicorn.app.base import BaseApplication

    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    settings: dict[str, Any] = {
        "bind": [bind],
        "workers": workers,
        "loglevel": log_level,
        "accesslog": None,
        "graceful_timeout": math.ceil(graceful_timeout),  # gunicorn takes whole seconds
        # gunicorn would trust X-Forwarded-Proto from 127.0.0.1 for wsgi.url_scheme.
        "forwarded_allow_ips": "",
        "secure_scheme_headers": {},
        # Above the core's own limits, so the core answers 414/431 on every server.
        "limit_request_line": 8190,
        "limit_request_fields": 32768,
        "limit_request_field_size": 1 << 20,
    }
    if "control_socket_disable" in gunicorn_settings():
        # gunicorn >= 25.1 opens a control socket at one per-user path
        # ($XDG_RUNTIME_DIR/gunicorn.ctl): two proxies on one machine would take
        # it from each other. `dualproxy serve` offers no gunicornc management.
        settings["control_socket_disable"] = True
    if certfile is not None:
        settings.update(certfile=certfile, keyfile=keyfile)
    if adapter == "wsgi":
        settings.update(worker_class="gthread", threads=threads, timeout=60, keepalive=5)
    else:
        settings.update(worker_class=UVICORN_WORKER, timeout=60)

    class Application(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            for key, value in settings.items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            return load()

    Application().run()
