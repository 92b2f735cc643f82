"""`dualproxy serve` and `dualproxy demo`: the four face x server pairings.

asgi on uvicorn, wsgi on gunicorn (gthread), wsgi on uvicorn through a2wsgi,
asgi on gunicorn with uvicorn workers. Whatever is started has the server's own
forwarding-header handling switched off (the core decides about X-Forwarded-*)
and header limits raised above the core's, so every pairing answers alike.
Worker processes rebuild the app from the options in an environment variable.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import math
import os
import re
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, NoReturn

from . import __version__
from .config import DEFAULT_IDLE_TIMEOUT, DEFAULT_TIMEOUT, ProxyConfig

ENV_OPTIONS = "DUALPROXY_SERVE_OPTIONS"
DEFAULT_SERVER = {"asgi": "uvicorn", "wsgi": "gunicorn"}


class _Parser(argparse.ArgumentParser):
    """argparse, with errors on one line: `dualproxy serve: error: ...` and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _bind(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    if not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 1-65535, got {port}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _positive(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {value!r}") from None
    if not 0 < number < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {value}")
    return number


def _count(value: str) -> int:
    if not value.strip().isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {value!r}")
    return int(value)


# Size suffixes are powers of 1024, as nginx's `client_max_body_size 1k`; the
# KiB spelling is accepted for the same value. No decimal KB/MB to confuse them.
_SIZE = re.compile(r"(\d+)\s*(?:([KMG])(?:iB)?)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def _size(value: str) -> int:
    match = _SIZE.fullmatch(value.strip())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"expected bytes >= 0, optionally with K, M or G (1K = 1024), got {value!r}")
    return int(match[1]) * _SIZE_UNITS[(match[2] or "").lower()]


def _mount(value: str) -> str:
    if not value.startswith("/"):
        raise argparse.ArgumentTypeError(f"must start with '/', got {value!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dualproxy",
        description="A streaming reverse proxy with a WSGI and an ASGI face.",
        epilog="Run `dualproxy serve --help` or `dualproxy demo --help` for their flags.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{serve,demo}")
    serve = sub.add_parser(
        "serve", help="proxy to an upstream",
        description="Serve the proxy: every request under --mount is streamed to --upstream.",
        epilog="example: dualproxy serve --upstream http://127.0.0.1:9000/base --mount /api")
    serve.add_argument("--upstream", required=True, metavar="URL",
                       help="upstream base URL, e.g. http://127.0.0.1:9000/base; its path is "
                            "the base every proxied path is appended to (required)")
    serve.add_argument("--mount", default="/", type=_mount, metavar="PREFIX",
                       help="only paths under this prefix are proxied, other paths answer 404 "
                            "(default: everything)")
    serve.add_argument("--bind", default="127.0.0.1:8000", type=_bind, metavar="HOST:PORT",
                       help="address to listen on (default: 127.0.0.1:8000)")
    serve.add_argument("--adapter", choices=("asgi", "wsgi"), default="asgi",
                       help="which face serves the requests (default: asgi)")
    serve.add_argument("--server", choices=("uvicorn", "gunicorn"), default=None,
                       help="HTTP server (default: uvicorn for asgi, gunicorn for wsgi)")
    serve.add_argument("--workers", type=_count, default=1, metavar="N",
                       help="worker processes (default: 1)")
    serve.add_argument("--threads", type=_count, default=32, metavar="N",
                       help="threads per worker for the wsgi face, i.e. concurrent requests "
                            "(default: 32)")
    serve.add_argument("--timeout", type=_positive, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                       help="seconds to connect and to wait for the response head, then 504 "
                            f"(default: {DEFAULT_TIMEOUT:g})")
    serve.add_argument("--idle-timeout", type=_positive, default=DEFAULT_IDLE_TIMEOUT,
                       metavar="SECONDS",
                       help="seconds allowed between two body chunks once streaming, then the "
                            f"client connection is aborted (default: {DEFAULT_IDLE_TIMEOUT:g})")
    serve.add_argument("--max-body-size", type=_size, default=None, metavar="BYTES",
                       help="largest request body, counted on the stream, then 413; K, M and "
                            "G suffixes are powers of 1024, as in nginx (default: unlimited)")
    serve.add_argument("--preserve-host", action="store_true",
                       help="send the client's Host upstream instead of the upstream's "
                            "authority (default: off)")
    serve.add_argument("--trusted-proxy", action="append", default=[], metavar="CIDR",
                       help="peer whose X-Forwarded-*/Forwarded headers are kept and appended "
                            "to; repeatable (default: none, they are dropped)")
    serve.add_argument("--max-connections", type=_count, default=100, metavar="N",
                       help="upstream connections per worker (default: 100)")
    serve.add_argument("--pool-timeout", type=_positive, default=5.0, metavar="SECONDS",
                       help="seconds to wait for a free upstream connection, then 503 "
                            "(default: 5)")
    serve.add_argument("--log-level", default="info",
                       choices=("debug", "info", "warning", "error", "critical"),
                       help="log level for dualproxy and the server (default: info)")
    serve.add_argument("--no-access-log", action="store_true",
                       help="do not write the one-line-per-request access log "
                            "(default: it is written)")

    demo = sub.add_parser(
        "demo", help="start a built-in upstream and a proxy in front of it",
        description="Start a small built-in upstream (streamed download, upload sink, SSE "
                    "clock) and the proxy in front of it, print what to try; Ctrl-C stops both.")
    demo.add_argument("--bind", default="127.0.0.1:8000", type=_bind, metavar="HOST:PORT",
                      help="address for the proxy (default: 127.0.0.1:8000)")
    demo.add_argument("--adapter", choices=("asgi", "wsgi"), default="asgi",
                      help="which face serves the requests (default: asgi)")
    return parser


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The JSON-able options a worker process needs to rebuild the app."""
    return {
        "upstream": args.upstream,
        "mount": args.mount,
        "adapter": args.adapter,
        "threads": args.threads,
        "timeout": args.timeout,
        "idle_timeout": args.idle_timeout,
        "max_body_size": args.max_body_size,
        "preserve_host": args.preserve_host,
        "trusted_proxies": args.trusted_proxy,
        "max_connections": args.max_connections,
        "pool_timeout": args.pool_timeout,
        "log_level": args.log_level,
        "access_log": not args.no_access_log,
    }


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s",
    )
    # httpx logs every request at INFO; dualproxy's access line already says it all.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))


def config_from_options(options: dict[str, Any]) -> ProxyConfig:
    """The ProxyConfig for `dualproxy serve`'s options (ValueError when one is invalid)."""
    return ProxyConfig.build(
        options["upstream"],
        mount=options["mount"],
        timeout=options["timeout"],
        idle_timeout=options["idle_timeout"],
        max_body_size=options["max_body_size"],
        preserve_host=options["preserve_host"],
        trusted_proxies=options["trusted_proxies"],
        max_connections=options["max_connections"],
        max_keepalive_connections=options["max_connections"],
        pool_timeout=options["pool_timeout"],
    )


def build_app(options: dict[str, Any]) -> Any:
    """The ASGI or WSGI app for the options (the same in every worker)."""
    config = config_from_options(options)
    if options["adapter"] == "asgi":
        from .asgi import AsyncProxy

        return AsyncProxy(config=config, access_log=options["access_log"])
    from .wsgi import SyncProxy

    return SyncProxy(config=config, access_log=options["access_log"])


def freeze_heap() -> None:
    """Exempt everything loaded so far from the cyclic garbage collector.

    A full collection otherwise walks every object of the loaded modules
    (uvicorn, httpx, ...), pausing the process for 15-30 ms several times a
    second under load: the proxy's worst latencies. Called once the app is built.
    """
    gc.collect()
    gc.freeze()


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


# How much request body uvicorn may buffer before it stops reading the client.
UVICORN_BODY_HIGH_WATER = 262144


def tune_uvicorn() -> None:
    """Let uvicorn read a request body in bigger steps than its 64 KiB.

    uvicorn pauses reading the client whenever more than HIGH_WATER_LIMIT
    (64 KiB) of body waits for the app's next receive(), and resumes at that
    receive: a fast upload goes pause, resume, pause, with an epoll change and
    a small message each time. Its protocols read the constant from their own
    module at every body callback, so raising it there takes effect; memory
    stays bounded per connection. Only for a uvicorn already loaded (the
    server running this process), never imported for gunicorn's threads.
    """
    if "uvicorn" not in sys.modules:
        return
    import importlib

    for name in ("uvicorn.protocols.http.httptools_impl", "uvicorn.protocols.http.h11_impl"):
        try:
            module = importlib.import_module(name)
        except ImportError:  # that parser's package is not installed
            continue
        limit = getattr(module, "HIGH_WATER_LIMIT", None)
        if isinstance(limit, int):
            vars(module)["HIGH_WATER_LIMIT"] = max(limit, UVICORN_BODY_HIGH_WATER)


def app_from_env() -> Any:
    """Factory for worker processes: the ASGI app described by ENV_OPTIONS."""
    options = json.loads(os.environ[ENV_OPTIONS])
    setup_logging(options["log_level"])
    tune_uvicorn()
    app = build_app(options)
    if options["adapter"] == "wsgi":
        from .bridge import WSGIBridge

        app = WSGIBridge(app, threads=options["threads"])
        trim_heap_periodically()
    freeze_heap()
    return app


def serve_uvicorn(options: dict[str, Any], host: str, port: int, workers: int) -> None:
    import uvicorn

    common: dict[str, Any] = {
        "host": host,
        "port": port,
        "proxy_headers": False,  # see DESIGN: never let the server rewrite the peer
        "access_log": False,     # dualproxy writes its own access line
        "log_level": options["log_level"],
        "lifespan": "on",
        "timeout_graceful_shutdown": 5,
    }
    os.environ[ENV_OPTIONS] = json.dumps(options)
    if workers > 1:
        uvicorn.run("dualproxy.cli:app_from_env", factory=True, workers=workers, **common)
    else:
        uvicorn.run(app_from_env(), **common)


def gunicorn_settings() -> dict[str, Any]:
    """The setting names this gunicorn knows."""
    from gunicorn.config import KNOWN_SETTINGS

    return {setting.name: setting for setting in KNOWN_SETTINGS}


def serve_gunicorn(options: dict[str, Any], host: str, port: int, workers: int) -> None:
    from gunicorn.app.base import BaseApplication

    os.environ[ENV_OPTIONS] = json.dumps(options)
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    settings: dict[str, Any] = {
        "bind": [bind],
        "workers": workers,
        "loglevel": options["log_level"],
        "accesslog": None,
        "graceful_timeout": 5,
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
    if options["adapter"] == "wsgi":
        settings.update(worker_class="gthread", threads=options["threads"],
                        timeout=60, keepalive=5)
    else:
        settings.update(worker_class="dualproxy.workers.UvicornWorker", timeout=60)

    class Application(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            for key, value in settings.items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            if options["adapter"] == "wsgi":
                setup_logging(options["log_level"])
                app = build_app(options)
                freeze_heap()
                trim_heap_periodically()  # in the worker: threads do not survive fork
                return app
            return app_from_env()

    Application().run()


def serve(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    host, port = args.bind
    server = args.server or DEFAULT_SERVER[args.adapter]
    if server == "uvicorn":
        serve_uvicorn(options, host, port, args.workers)
    else:
        serve_gunicorn(options, host, port, args.workers)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        try:
            config_from_options(options_from_args(args))
        except ValueError as exc:  # the upstream URL, a trusted-proxy CIDR
            parser.exit(2, f"dualproxy serve: error: {exc} (see dualproxy serve --help)\n")
        return serve(args)
    from .demo import run_demo

    return run_demo(args)


if __name__ == "__main__":
    sys.exit(main())
