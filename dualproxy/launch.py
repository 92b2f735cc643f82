"""From `dualproxy serve`'s options to a running server and the app each worker builds.

The options are JSON-able (cli.py makes them from the flags or a config file):
the server's worker processes rebuild the same app from them, found in an
environment variable, so every process of every pairing serves alike.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import ssl
import sys
from typing import Any

from .config import ProxyConfig
from .drain import DRAIN
from .logs import LINE_FORMAT, AccessLineHandler, LineFormatter, access_logger
from .servers import ENV_OPTIONS
from .servers.granian import serve_granian
from .servers.gunicorn import serve_gunicorn
from .servers.heap import freeze_heap, keep_body_buffers, trim_heap_periodically
from .servers.limits import DEFAULT_HEADER_TIMEOUT, set_header_timeout
from .servers.metrics import start_metrics_listener
from .servers.uvicorn import quiet_uvicorn_refusals, serve_uvicorn, tune_uvicorn
from .upstreams import parse_upstreams


def setup_logging(level: str, access_log_format: str = "text") -> None:
    """Log lines to stderr: `asctime level [pid] logger: message`; json access lines alone.

    A line costs less without what the format never shows: the caller's file and
    line (`logging._srcfile`, the logging docs' own optimization), thread and
    multiprocessing names, and a strftime per line. Access lines go to stderr's
    descriptor through an `AccessLineHandler`, which lets them skip `logging`.
    """
    logging._srcfile = None
    logging.logThreads = logging.logMultiprocessing = False
    handler = logging.StreamHandler()
    handler.setFormatter(LineFormatter(LINE_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    for old in [h for h in access_logger.handlers if isinstance(h, AccessLineHandler)]:
        access_logger.removeHandler(old)  # set up again in the same process
    sys.stderr.flush()  # what logging wrote before, ahead of the unbuffered access lines
    access_logger.addHandler(AccessLineHandler(sys.stderr, prefixed=access_log_format == "text"))
    access_logger.propagate = False
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
        client_timeout=options["client_timeout"],
        max_body_size=options["max_body_size"],
        ws_max_size=options["ws_max_size"],
        ws_idle_timeout=options["ws_idle_timeout"],
        preserve_host=options["preserve_host"],
        underscores_in_headers=options["underscores_in_headers"],
        compress=options.get("compress", False),
        trusted_proxies=options["trusted_proxies"],
        header_up=options["header_up"],
        header_down=options["header_down"],
        request_id=options["request_id"],
        **tracing_options(options),
        # The CLI always names the mount: on (None) unless --no-forwarded-prefix.
        forwarded_prefix=None if options["forwarded_prefix"] else False,
        max_connections=options["max_connections"],
        max_keepalive_connections=options["max_connections"],
        pool_timeout=options["pool_timeout"],
        # --- gateway: pool ---
        balance=options["balance"],
        max_fails=options["max_fails"],
        fail_timeout=options["fail_timeout"],
        retries=options["retries"],
        health_path=options["health_path"],
        health_interval=options["health_interval"],
        # --- gateway: rate limits ---
        rate_limit=options.get("rate_limit"),
        rate_burst=options.get("rate_burst"),
        rate_key=options.get("rate_key", "client"),
        rate_max_inflight=options.get("rate_max_inflight"),
        rate_limit_store=options.get("rate_limit_store", "memory"),
        # --- filters: cache ---
        cache=options.get("cache", False),
        cache_store=options.get("cache_store") or "memory",
        cache_max_size=options.get("cache_max_size") or 256 * 1024 * 1024,
        cache_max_object=options.get("cache_max_object") or 64 * 1024 * 1024,
        cache_set_cookie=options.get("cache_set_cookie", False),
        cache_purge_from=tuple(options.get("cache_purge_from") or ()),
        # --- filters: sub_filter ---
        sub_filter=[tuple(pair) for pair in options.get("sub_filter") or ()],
        sub_filter_types=options.get("sub_filter_types") or (),
        # --- gateway: tls ---
        **tls_options(options),
    )


def tracing_options(options: dict[str, Any]) -> dict[str, Any]:
    """ProxyConfig's tracing fields; with tracing on, what the CLI's tracing needs is
    checked (the SDK, OTEL_TRACES_EXPORTER: ValueError, a usage error)."""
    if not options.get("tracing"):
        return {}
    from .filters.tracing import check_setup

    check_setup()
    return {"tracing": True, "tracing_new_traces": options.get("tracing_new_traces", False)}


def setup_tracing(options: dict[str, Any]) -> None:
    """This worker process's tracer provider, when a route traces (none: nothing imported)."""
    if any(route.get("tracing") for route in options.get("routes") or [options]):
        from .filters.tracing import setup_from_env

        setup_from_env()


# --- gateway: tls ---
def tls_options(options: dict[str, Any]) -> dict[str, Any]:
    """ProxyConfig's `verify` and `cert` from the --upstream-* flags (httpx's meanings)."""
    cert, key = options.get("upstream_cert"), options.get("upstream_key")
    if key is not None and cert is None:
        raise ValueError("--upstream-key needs --upstream-cert")
    if options.get("upstream_insecure") and options.get("upstream_ca"):
        raise ValueError("--upstream-ca and --upstream-insecure contradict each other")
    verify = False if options.get("upstream_insecure") else options.get("upstream_ca") or True
    return {"verify": verify, "cert": (cert, key) if key is not None else cert}


def check_tls(options: dict[str, Any], config: ProxyConfig | None = None) -> None:
    """Load every TLS file now, so a bad one is a usage error naming it (ValueError):
    the upstream side for `config` (one route), the serving side from the options."""
    if config is not None:
        from .http1.tls import upstream_context

        upstream_context(config)
    certfile, keyfile = options.get("certfile"), options.get("keyfile")
    if (certfile is None) != (keyfile is None):
        raise ValueError("--certfile and --keyfile go together")
    if certfile is not None:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                certfile, keyfile)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot load --certfile {certfile} with --keyfile {keyfile}: "
                             f"{getattr(exc, 'reason', None) or exc}") from None


def warn_insecure(options: dict[str, Any]) -> None:
    if any(route.get("upstream_insecure") for route in options.get("routes") or [options]):
        logging.getLogger("dualproxy").warning(
            "--upstream-insecure: TLS certificates of https upstreams are NOT verified; "
            "anyone on the path can impersonate them")


def warn_unresolved(options: dict[str, Any]) -> None:
    """One WARNING a configured upstream host that does not resolve now: every request
    to it would be a 502 until it does (DNS may yet learn it, so this does not stop)."""
    hosts: dict[str, int] = {}
    for route in options.get("routes") or [options]:
        for upstream in parse_upstreams(route["upstream"]):
            if upstream.scheme != "unix":
                hosts.setdefault(upstream.host, upstream.port)
    for host, port in hosts.items():
        try:
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            logging.getLogger("dualproxy").warning(
                "upstream host %s does not resolve (%s): its requests fail with 502 until "
                "it does", host, reason)


def build_app(options: dict[str, Any]) -> Any:
    """The ASGI or WSGI app for the options (the same in every worker): one proxy, or a
    router over one proxy a route when `options["routes"]` lists several (--config)."""
    log = {"access_log": options["access_log"],
           "access_log_format": options["access_log_format"],
           "metrics": options["metrics"]}
    configs = [config_from_options(route) for route in options.get("routes") or [options]]
    if options["adapter"] == "asgi":
        from .asgi import AsyncProxy
        from .router import AsyncRouter

        proxies = [AsyncProxy(config=config, **log) for config in configs]
        return proxies[0] if len(proxies) == 1 else AsyncRouter(proxies)
    from .router import SyncRouter
    from .wsgi import SyncProxy

    sync_proxies = [SyncProxy(config=config, **log) for config in configs]
    return sync_proxies[0] if len(sync_proxies) == 1 else SyncRouter(sync_proxies)


def load_app(options: dict[str, Any]) -> Any:
    """The app one worker process serves, set up for the server running it."""
    setup_logging(options["log_level"], options["access_log_format"])
    DRAIN.arm(options["graceful_timeout"])  # the server's stop starts its clock
    set_header_timeout(options.get("header_timeout", DEFAULT_HEADER_TIMEOUT))
    warn_insecure(options)
    tune_uvicorn()  # a no-op unless uvicorn runs this process
    quiet_uvicorn_refusals()
    setup_tracing(options)  # per worker process, after the fork, before the app
    app = build_app(options)
    if options["adapter"] == "wsgi":
        if options["server"] in ("uvicorn", "granian"):  # ASGI servers: the a2wsgi bridge
            from .bridge import WSGIBridge

            app = WSGIBridge(app, threads=options["threads"])
        else:  # a WebSocket tunnel holds a gthread thread (the bridge's run async)
            from .websocket.tunnel import TUNNELS, default_max_tunnels

            tunnels = options.get("ws_max_tunnels")
            TUNNELS.limit = default_max_tunnels(options["threads"]) if tunnels is None else tunnels
        trim_heap_periodically()  # in the worker: threads do not survive fork
    freeze_heap()
    keep_body_buffers()
    return app


def app_from_env() -> Any:
    """Factory for uvicorn's worker processes: the app described by ENV_OPTIONS."""
    return load_app(json.loads(os.environ[ENV_OPTIONS]))


def listen_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port (taken, not ours, no such address),
    found by binding it as the servers do (SO_REUSEADDR); None when it can."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
    except OSError as exc:
        return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    return None


def run(options: dict[str, Any], *, bind: tuple[str, int], workers: int,
        metrics_bind: tuple[str, int] | None) -> int:
    """Start the options' server in front of the app; return the exit status: 0, or 1
    when it could not start (one `dualproxy serve: error:` line says why)."""
    host, port = bind
    # Checked first, so a taken port is one line whatever the server (uvicorn logs
    # and exits 1, gunicorn retries five times and exits 1 or 3).
    problem = listen_problem(host, port)
    if problem is not None:
        print(f"dualproxy serve: error: {problem}", file=sys.stderr)
        return 1
    setup_logging(options["log_level"], options["access_log_format"])
    warn_unresolved(options)  # once, here: not in every worker
    os.environ[ENV_OPTIONS] = json.dumps(options)
    # Several processes share the metrics through files (servers/metrics.py): always
    # under gunicorn (its arbiter serves them) and granian (its workers are processes
    # of their own even when there is one), and under uvicorn's --workers N.
    multiprocess = options["server"] in ("gunicorn", "granian") or workers > 1
    try:
        listener = start_metrics_listener(metrics_bind, multiprocess=multiprocess)
    except OSError as exc:
        print(f"dualproxy serve: error: --metrics-bind: {exc}", file=sys.stderr)
        return 1
    try:
        return _serve(options, host, port, workers, listener)
    except SystemExit as exc:  # the server's own failure (the port taken since the check)
        if exc.code in (0, None):
            raise
        print(f"dualproxy serve: error: the server stopped with status {exc.code} (its log "
              "above says why)", file=sys.stderr)
        return 1
    finally:
        if listener is not None:
            listener.close()


def _serve(options: dict[str, Any], host: str, port: int, workers: int,
           listener: Any) -> int:
    """Run the options' server until it stops."""
    if options["server"] == "uvicorn":
        serve_uvicorn(lambda: load_app(options), "dualproxy.launch:app_from_env", host=host,
                      port=port, workers=workers, log_level=options["log_level"],
                      ws_max_size=options["ws_max_size"],
                      graceful_timeout=options["graceful_timeout"],
                      certfile=options["certfile"], keyfile=options["keyfile"])
    elif options["server"] == "granian":
        serve_granian(lambda: load_app(options), host=host, port=port, workers=workers,
                      log_level=options["log_level"],
                      graceful_timeout=options["graceful_timeout"],
                      header_timeout=options["header_timeout"], http=options.get("http", "1"),
                      certfile=options["certfile"], keyfile=options["keyfile"])
    else:
        serve_gunicorn(lambda: load_app(options), adapter=options["adapter"], host=host,
                       port=port, workers=workers, threads=options["threads"],
                       log_level=options["log_level"],
                       graceful_timeout=options["graceful_timeout"],
                       certfile=options["certfile"], keyfile=options["keyfile"],
                       child_exit=listener.child_exit if listener else None)
    return 0
