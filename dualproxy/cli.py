"""`dualproxy serve` and `dualproxy demo`: the flags, their usage errors, the options.

`serve` runs one of the six face x server pairings (asgi on uvicorn, wsgi on
gunicorn (gthread), wsgi on uvicorn through a2wsgi, asgi on gunicorn with uvicorn
workers, asgi and wsgi (through a2wsgi) on granian's ASGI interface) from the
flags or a `--config` file (configfile.py); every value is checked here, before
anything starts, and becomes JSON-able options that launch.py hands to the server
and its worker processes.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn, cast

from . import __version__
from .config import (
    BALANCE_POLICIES,
    DEFAULT_CLIENT_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_TIMEOUT,
    DEFAULT_WS_MAX_SIZE,
    MAX_TIMEOUT,
    ProxyConfig,
    check_mount,
)
from .launch import check_tls, config_from_options, listen_problem, run
from .logs import FORMATS
from .servers.limits import DEFAULT_HEADER_TIMEOUT, HEAD_LIMIT, REQUEST_LINE_LIMIT

DEFAULT_SERVER = {"asgi": "uvicorn", "wsgi": "gunicorn"}
SERVERS = ("uvicorn", "gunicorn", "granian")


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
    if not 0 < number <= MAX_TIMEOUT:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, at most "
                                         f"{MAX_TIMEOUT:.0f}, got {value}")
    return number


def _count(value: str) -> int:
    if not value.strip().isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {value!r}")
    return int(value)


# More processes than this is a typo, not a machine: each one holds its own pool.
MAX_WORKERS = 256
MAX_THREADS = 4096


def _workers(value: str) -> int:
    count = _count(value)
    if count > MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_WORKERS}, got {value!r}")
    return count


def _threads(value: str) -> int:
    count = _count(value)
    if count > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_THREADS}, got {value!r}")
    return count


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


def _positive_size(value: str) -> int:
    size = _size(value)
    if size < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {value!r}")
    return size


def _whole(value: str) -> int:
    if not value.strip().isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {value!r}")
    return int(value)


def _mount(value: str) -> str:
    if not value.startswith("/"):
        raise argparse.ArgumentTypeError(f"must start with '/', got {value!r}")
    try:
        check_mount(value, "the path")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


# --- gateway: rate limits ---
def _checked(check: Any) -> Any:
    """An argparse type from a ValueError-raising check (filters/ratelimit.py's)."""
    def convert(value: str) -> str:
        try:
            check(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return value

    convert.__name__ = check.__name__
    return convert


def _rate_checks() -> tuple[Any, Any, Any]:
    from .filters.ratelimit import check_store, parse_key, parse_rate

    return _checked(parse_rate), _checked(parse_key), _checked(check_store)


_rate, _rate_key, _rate_store = _rate_checks()
# --- filters: sub_filter ---
def _sub_pair(value: str) -> tuple[str, str]:
    """`FROM=TO` (split at the first `=`): a --sub-filter replacement."""
    src, eq, dst = value.partition("=")
    if not eq or not src:
        raise argparse.ArgumentTypeError(f"expected FROM=TO with a non-empty FROM, got {value!r}")
    return src, dst


def _media_type(value: str) -> str:
    from .config import check_types

    try:
        return check_types(value)[0]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# --- gateway: tls ---
TLS_FILE_FLAGS = (
    ("--upstream-ca", "verify https upstreams against this CA bundle (PEM file or hashed "
                      "directory) instead of the system CAs (default: system CAs)"),
    ("--upstream-cert", "client certificate for mutual TLS with https upstreams (PEM; may "
                        "hold the key too) (default: none)"),
    ("--upstream-key", "the key of --upstream-cert, when not in its file (default: none)"),
    ("--certfile", "serve HTTPS with this certificate chain (PEM); needs --keyfile "
                   "(default: plain HTTP)"),
    ("--keyfile", "the private key of --certfile (PEM) (default: none)"),
)


def _readable(value: str) -> str:
    try:
        with open(value, "rb"):
            pass
    except IsADirectoryError:
        return value  # a CA directory (--upstream-ca); a misused one fails when loaded
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {value}: {exc.strerror}") from None
    return value


# The TOML types a config-file value may have, by its flag's validator (configfile.py;
# a flag with no validator takes a string, one with a validator not listed a string
# or a number).
TOML_TYPES: dict[Any, tuple[type, ...]] = {
    _positive: (int, float), _count: (int,), _workers: (int,), _threads: (int,),
    _size: (int, str), _positive_size: (int, str),
    _bind: (str,), _mount: (str,), _whole: (int,),
    _rate: (str,), _rate_key: (str,), _rate_store: (str,),
}


def build_parser() -> argparse.ArgumentParser:
    """The whole command line, built without side effects: `main` parses with it and the
    docs render their CLI reference from it (docs/hooks/cli_reference.py)."""
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
    serve.add_argument("--upstream", default=None, action="append", metavar="URL",
                       help="upstream base URL, e.g. http://127.0.0.1:9000/base; its path is "
                            "the base every proxied path is appended to; repeat it for a "
                            "balanced pool, one base path for all (required), unless --config "
                            "gives the routes")
    serve.add_argument("--mount", default="/", type=_mount, metavar="PREFIX",
                       help="only paths under this prefix are proxied, other paths answer 404 "
                            "(default: everything)")
    serve.add_argument("--bind", default="127.0.0.1:8000", type=_bind, metavar="HOST:PORT",
                       help="address to listen on (default: 127.0.0.1:8000)")
    serve.add_argument("--adapter", choices=("asgi", "wsgi"), default="asgi",
                       help="which face serves the requests (default: asgi)")
    serve.add_argument("--server", choices=SERVERS, default=None,
                       help="HTTP server; granian runs both faces on its ASGI interface "
                            "(default: uvicorn for asgi, gunicorn for wsgi)")
    serve.add_argument("--http", choices=("1", "2", "auto"), default="1",
                       help="HTTP versions served to clients, on --server granian only: 1 "
                            "(HTTP/1.1), 2 (HTTP/2 alone: h2 by ALPN with --certfile, else "
                            "h2c with prior knowledge; no WebSockets), or auto (both: by ALPN "
                            "with --certfile, else by the client's first bytes) (default: 1)")
    serve.add_argument("--workers", type=_workers, default=1, metavar="N",
                       help=f"worker processes, at most {MAX_WORKERS} (default: 1)")
    serve.add_argument("--threads", type=_threads, default=32, metavar="N",
                       help="threads per worker for the wsgi face, i.e. concurrent requests, "
                            f"at most {MAX_THREADS} (default: 32)")
    serve.add_argument("--ws-max-tunnels", type=_whole, default=None, metavar="N",
                       help="WebSockets one worker holds open with the wsgi face on gunicorn, "
                            "where each holds one of its --threads; past it a handshake gets "
                            "503 with Retry-After, so plain HTTP always keeps threads "
                            "(default: threads - max(1, threads // 4), 24 of 32; the other "
                            "pairings hold no thread per WebSocket and have no such cap)")
    serve.add_argument("--header-timeout", type=_positive, default=DEFAULT_HEADER_TIMEOUT,
                       metavar="SECONDS",
                       help="seconds a client has to send a request head, from its connection "
                            "or the head's first byte, then its connection is closed (408 if "
                            "the head had begun), as nginx's client_header_timeout; heads are "
                            f"also bounded in size: a request line past {REQUEST_LINE_LIMIT} "
                            f"bytes gets 414, a head past {HEAD_LIMIT >> 10} KiB 431, unread "
                            f"(default: {DEFAULT_HEADER_TIMEOUT:g})")
    serve.add_argument("--timeout", type=_positive, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                       help="seconds to connect and receive the whole response head (counted "
                            "from the end of the request body, when there is one), then 504 "
                            f"(default: {DEFAULT_TIMEOUT:g})")
    serve.add_argument("--idle-timeout", type=_positive, default=DEFAULT_IDLE_TIMEOUT,
                       metavar="SECONDS",
                       help="seconds allowed between two body chunks once streaming, then the "
                            f"client connection is aborted (default: {DEFAULT_IDLE_TIMEOUT:g})")
    serve.add_argument("--client-timeout", type=_positive, default=DEFAULT_CLIENT_TIMEOUT,
                       metavar="SECONDS",
                       help="seconds allowed between two reads of the client's request body "
                            "(as nginx's client_body_timeout), then 408 and the upstream "
                            f"request is aborted (default: {DEFAULT_CLIENT_TIMEOUT:g})")
    serve.add_argument("--ws-max-size", type=_positive_size, default=DEFAULT_WS_MAX_SIZE,
                       metavar="BYTES",
                       help="largest WebSocket message either way, then the socket is closed "
                            "with 1009; K, M and G suffixes as for --max-body-size "
                            f"(default: {DEFAULT_WS_MAX_SIZE >> 20}M)")
    serve.add_argument("--ws-idle-timeout", type=_positive, default=None, metavar="SECONDS",
                       help="close an open WebSocket (1001) after this long without a message "
                            "either way; --timeout bounds only its handshake (default: no "
                            "limit)")
    serve.add_argument("--max-body-size", type=_size, default=None, metavar="BYTES",
                       help="largest request body, counted on the stream, then 413; K, M and "
                            "G suffixes are powers of 1024, as in nginx (default: unlimited)")
    serve.add_argument("--preserve-host", action="store_true",
                       help="send the client's Host upstream instead of the upstream's "
                            "authority (default: off)")
    serve.add_argument("--underscores-in-headers", action="store_true",
                       help="forward request header names containing '_' (X_Api_Key); by "
                            "default they are dropped, as nginx's underscores_in_headers off: "
                            "a WSGI upstream reads X_Forwarded_For as X-Forwarded-For. "
                            "gunicorn's WSGI face drops them whatever this says (its environ "
                            "cannot tell _ from -) (default: dropped)")
    serve.add_argument("--compress", action="store_true",
                       help="compress response bodies as they stream, in zstd, br or gzip as "
                            "the client's Accept-Encoding prefers, flushed after every upstream "
                            "chunk; text, JSON, JS, XML, SVG and wasm types of at least 1 KiB, "
                            "never bodies already encoded, no-transform, 206 or HEAD answers "
                            "(default: off; br and zstd need the `compress` extra)")
    serve.add_argument("--trusted-proxy", action="append", default=[], metavar="CIDR",
                       help="peer whose X-Forwarded-*/Forwarded headers are kept and appended "
                            "to; repeatable (default: none, they are dropped)")
    # --- built-in filters: header rules, request ids, X-Forwarded-Prefix ---
    serve.add_argument("--header-up", action="append", default=[], metavar="RULE",
                       help="a header rule for the request sent upstream, repeatable, in "
                            "order: 'Name: value' sets, '+Name: value' adds, '-Name' removes "
                            "(write --header-up=-Name); values may name {client}, "
                            "{request_id}, {host} and {scheme}, as in 'X-Real-IP: {client}' "
                            "(default: none)")
    serve.add_argument("--header-down", action="append", default=[], metavar="RULE",
                       help="a header rule for the response sent to the client, written as "
                            "for --header-up (Date, Server and Host excluded), e.g. "
                            "--header-down '+Cache-Control: no-store' (default: none)")
    serve.add_argument("--request-id", action="store_true",
                       help="give each request an X-Request-ID: a trusted proxy's is kept "
                            "(1 to 200 visible ASCII characters, no comma), otherwise one is "
                            "made (32 hex digits); sent upstream, returned to the client and "
                            "written in the access log (default: off)")
    serve.add_argument("--tracing", action="store_true",
                       help="OpenTelemetry tracing: a SERVER span per request and a CLIENT "
                            "span per upstream try, traceparent sent upstream, trace_id in the "
                            "access log; set up from the OTEL_* variables (OTEL_TRACES_EXPORTER="
                            "otlp|console|none, OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME, "
                            "OTEL_TRACES_SAMPLER); a --trusted-proxy's traceparent is continued "
                            "(default: off; needs the `tracing` extra)")
    serve.add_argument("--tracing-new-traces", action="store_true",
                       help="with --tracing, start a new trace for every request (default: "
                            "off: a trusted proxy's traceparent is continued)")
    serve.add_argument("--no-forwarded-prefix", action="store_true",
                       help="do not send the mount upstream as X-Forwarded-Prefix (default: "
                            "sent whenever --mount strips a prefix, appended to a trusted "
                            "proxy's own)")
    serve.add_argument("--max-connections", type=_count, default=100, metavar="N",
                       help="upstream connections per worker (default: 100)")
    serve.add_argument("--pool-timeout", type=_positive, default=5.0, metavar="SECONDS",
                       help="seconds to wait for a free upstream connection, then 503 "
                            "(default: 5)")
    serve.add_argument("--graceful-timeout", type=_positive, default=30.0, metavar="SECONDS",
                       help="on SIGTERM (or a first SIGINT) stop accepting and let in-flight "
                            "requests finish for this long, then cut what is left (default: 30)")
    serve.add_argument("--log-level", default="info",
                       choices=("debug", "info", "warning", "error", "critical"),
                       help="log level for dualproxy and the server (default: info)")
    serve.add_argument("--no-access-log", action="store_true",
                       help="do not write the one-line-per-request access log "
                            "(default: it is written)")
    serve.add_argument("--access-log-format", choices=FORMATS, default="text",
                       help="access log lines as text, or json: one JSON object a line "
                            "(default: text)")
    # --- gateway: pool ---
    serve.add_argument("--balance", choices=BALANCE_POLICIES, default="least-conn",
                       help="how a pool of upstreams is balanced: fewest requests in flight "
                            "(ties in turn), strictly in turn, or the better of two random "
                            "picks (default: least-conn)")
    serve.add_argument("--max-fails", type=_whole, default=1, metavar="N",
                       help="failures (connect, timeout, broken before the head) within "
                            "--fail-timeout that mark an upstream down for --fail-timeout; "
                            "0: never (default: 1)")
    serve.add_argument("--fail-timeout", type=_positive, default=10.0, metavar="SECONDS",
                       help="the window for --max-fails and how long a failed upstream is "
                            "skipped (default: 10)")
    serve.add_argument("--retries", type=_whole, default=2, metavar="N",
                       help="tries on other upstreams after a failure, only for requests never "
                            "sent or idempotent and bodiless ones (default: 2)")
    serve.add_argument("--health-path", type=_mount, default=None, metavar="PATH",
                       help="actively check each upstream with a GET of its base + PATH; "
                            "2xx/3xx is up (default: passive checks only)")
    serve.add_argument("--health-interval", type=_positive, default=5.0, metavar="SECONDS",
                       help="seconds between two active checks (default: 5)")
    # --- gateway: rate limits ---
    limits = serve.add_argument_group("rate limits")
    limits.add_argument("--rate-limit", type=_rate, default=None, metavar="RATE",
                        help="requests per key allowed at this rate, e.g. 100/second, "
                             "10/minute, 1000/hour, as nginx's limit_req nodelay: a bucket of "
                             "--rate-burst requests refilled at RATE; past it 429 with "
                             "Retry-After at once, never delayed; answers carry RateLimit-Policy "
                             "and RateLimit (default: no limit)")
    limits.add_argument("--rate-burst", type=_count, default=None, metavar="N",
                        help="requests a key may make at once, the bucket's size (default: "
                             "the rate's count, 100 for 100/second)")
    limits.add_argument("--rate-key", type=_rate_key, default="client", metavar="KEY",
                        help="what a bucket is per: client (its address, after trusted "
                             "proxies), header:NAME (e.g. header:X-Api-Key; without it, the "
                             "client's address) or route (one for all) (default: client)")
    limits.add_argument("--rate-max-inflight", type=_count, default=None, metavar="N",
                        help="requests in flight per key and worker, then 429 (nginx's "
                             "limit_conn) (default: no cap)")
    limits.add_argument("--rate-limit-store", type=_rate_store, default="memory",
                        metavar="STORE",
                        help="memory: each worker process keeps its own buckets (N workers "
                             "admit N times the rate); redis://HOST:PORT/DB: one bucket per key "
                             "for every worker and proxy sharing that Redis (the `ratelimit` "
                             "extra); if it fails the limit steps aside, requests pass "
                             "(default: memory)")
    # --- filters: sub_filter ---
    serve.add_argument("--sub-filter", type=_sub_pair, action="append", default=[],
                       metavar="FROM=TO",
                       help="replace the text FROM by TO in response bodies (nginx's "
                            "sub_filter), every occurrence, also when split between chunks; "
                            "encoded bodies are decoded first and sent decoded; repeatable; "
                            "the first = splits (default: no replacement)")
    serve.add_argument("--sub-filter-type", type=_media_type, action="append", default=[],
                       metavar="TYPE",
                       help="a media type --sub-filter rewrites (text/css, text/*); repeatable "
                            "(default: text/html)")
    # --- gateway: tls ---
    tls = serve.add_argument_group("TLS")
    for flag, text in TLS_FILE_FLAGS:
        tls.add_argument(flag, type=_readable, default=None, metavar="FILE", help=text)
    tls.add_argument("--upstream-insecure", action="store_true",
                     help="do not verify https upstreams' certificates at all; logs a WARNING "
                          "at start (default: verified)")
    # --- gateway: routes ---
    serve.add_argument("--config", default=None, metavar="FILE.toml",
                       help="several routes from a TOML file: server options at the top, "
                            "one [[route]] table a route (mount, upstream and the route "
                            "options); server flags given here win over the file's, route "
                            "flags are refused (default: one route from the flags)")
    # --- operations: metrics ---
    serve.add_argument("--metrics-bind", type=_bind, default=None, metavar="HOST:PORT",
                       help="serve Prometheus metrics at /metrics (and 200 ok at /healthz) on "
                            "this address, a listener of its own; needs the `metrics` extra "
                            "(default: no metrics)")
    # --- filters: cache ---
    cache = serve.add_argument_group("cache")
    cache.add_argument("--cache", action="store_true",
                       help="an RFC 9111 shared HTTP cache in front of the upstream: hits "
                            "answered by the proxy, misses streamed and stored "
                            "(default: off)")
    cache.add_argument("--cache-store", default="memory", metavar="STORE",
                       help="where the cache keeps responses: memory (each worker its own), "
                            "sqlite:PATH (one file the workers of a machine share) or "
                            "redis://HOST:PORT/DB (one cache for many proxies; the redis "
                            "extra) (default: memory)")
    cache.add_argument("--cache-max-size", type=_positive_size, default=256 << 20,
                       metavar="BYTES",
                       help="the cache's size bound, least recently used evicted first; K, M "
                            "and G suffixes as for --max-body-size (default: 256M)")
    cache.add_argument("--cache-max-object", type=_positive_size, default=64 << 20,
                       metavar="BYTES",
                       help="larger responses pass through, uncached (default: 64M)")
    cache.add_argument("--cache-set-cookie", action="store_true",
                       help="store responses carrying Set-Cookie too (default: they are one "
                            "user's, never stored)")
    cache.add_argument("--cache-purge-from", action="append", default=[], metavar="CIDR",
                       help="peers allowed to PURGE a URL from the cache, besides "
                            "--trusted-proxy ones; repeatable; anyone else gets 405 "
                            "(default: trusted proxies only)")

    demo = sub.add_parser(
        "demo", help="start a built-in upstream and a proxy in front of it",
        description="Start a small built-in upstream (a page at /, a streamed download, an "
                    "upload sink, an SSE clock, a WebSocket chat) and the proxy in front of it, "
                    "print what to try; Ctrl-C stops both.")
    demo.add_argument("--bind", default="127.0.0.1:8000", type=_bind, metavar="HOST:PORT",
                      help="address for the proxy (default: 127.0.0.1:8000)")
    demo.add_argument("--adapter", choices=("asgi", "wsgi"), default="asgi",
                      help="which face serves the requests (default: asgi)")
    demo.add_argument("--server", choices=SERVERS, default=None,
                      help="HTTP server (default: uvicorn for asgi, gunicorn for wsgi)")
    return parser


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The JSON-able options a worker process needs to rebuild the app."""
    return {
        "upstream": args.upstream,
        "mount": args.mount,
        "adapter": args.adapter,
        "server": args.server or DEFAULT_SERVER[args.adapter],
        "http": args.http,
        "threads": args.threads,
        "ws_max_tunnels": args.ws_max_tunnels,
        "header_timeout": args.header_timeout,
        "timeout": args.timeout,
        "idle_timeout": args.idle_timeout,
        "client_timeout": args.client_timeout,
        "max_body_size": args.max_body_size,
        "ws_max_size": args.ws_max_size,
        "ws_idle_timeout": args.ws_idle_timeout,
        "preserve_host": args.preserve_host,
        "underscores_in_headers": args.underscores_in_headers,
        "compress": args.compress,
        "trusted_proxies": args.trusted_proxy,
        "header_up": args.header_up,
        "header_down": args.header_down,
        "request_id": args.request_id,
        "tracing": args.tracing,
        "tracing_new_traces": args.tracing_new_traces,
        "forwarded_prefix": not args.no_forwarded_prefix,
        "max_connections": args.max_connections,
        "pool_timeout": args.pool_timeout,
        "graceful_timeout": args.graceful_timeout,
        "log_level": args.log_level,
        "access_log": not args.no_access_log,
        "access_log_format": args.access_log_format,
        # --- gateway: pool ---
        "balance": args.balance,
        "max_fails": args.max_fails,
        "fail_timeout": args.fail_timeout,
        "retries": args.retries,
        "health_path": args.health_path,
        "health_interval": args.health_interval,
        # --- gateway: rate limits ---
        "rate_limit": args.rate_limit,
        "rate_burst": args.rate_burst,
        "rate_key": args.rate_key,
        "rate_max_inflight": args.rate_max_inflight,
        "rate_limit_store": args.rate_limit_store,
        # --- filters: sub_filter ---
        "sub_filter": [list(pair) for pair in args.sub_filter],
        "sub_filter_types": args.sub_filter_type,
        # --- gateway: tls ---
        "upstream_ca": args.upstream_ca,
        "upstream_cert": args.upstream_cert,
        "upstream_key": args.upstream_key,
        "upstream_insecure": args.upstream_insecure,
        "certfile": args.certfile,
        "keyfile": args.keyfile,
        # --- operations: metrics ---
        "metrics": args.metrics_bind is not None,
        # --- filters: cache ---
        "cache": args.cache,
        "cache_store": args.cache_store,
        "cache_max_size": args.cache_max_size,
        "cache_max_object": args.cache_max_object,
        "cache_set_cookie": args.cache_set_cookie,
        "cache_purge_from": args.cache_purge_from,
    }


def serve(args: argparse.Namespace, routes: list[dict[str, Any]] | None = None) -> int:
    """Run `dualproxy serve` with its parsed flags (and a config file's routes)."""
    options = options_from_args(args)
    if routes:  # --config: the server's WebSocket limit is the largest route's
        options["routes"] = routes
        options["ws_max_size"] = max(route["ws_max_size"] for route in routes)
    return run(options, bind=args.bind, workers=args.workers, metrics_bind=args.metrics_bind)


def demo(args: argparse.Namespace) -> int:
    """Start the demo upstream, print what to try, serve the proxy until Ctrl-C."""
    from .demo import demo_upstream, instructions

    host, proxy_port = args.bind
    problem = listen_problem(host, proxy_port)
    if problem is not None:  # before the banner tells anyone to open the page
        print(f"dualproxy demo: error: {problem}", file=sys.stderr)
        return 1
    try:
        with demo_upstream() as port:
            print(instructions(port, f"http://{host}:{proxy_port}", args.adapter), flush=True)
            server = ["--server", args.server] if args.server else []
            return serve(build_parser().parse_args([
                "serve", "--upstream", f"http://127.0.0.1:{port}",
                "--bind", f"{host}:{proxy_port}", "--adapter", args.adapter, *server]))
    except KeyboardInterrupt:
        return 0


def _check_metrics_bind(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--metrics-bind is a listener of its own, and needs prometheus_client."""
    problem = None
    if args.metrics_bind == args.bind:
        problem = "--metrics-bind must differ from --bind (metrics never share the proxied port)"
    elif importlib.util.find_spec("prometheus_client") is None:
        problem = "--metrics-bind needs prometheus_client: pip install 'dualproxy[metrics]'"
    if problem is not None:
        parser.exit(2, f"dualproxy serve: error: {problem}\n")


def _check_server(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--server granian needs a granian release the suite tests (servers/granian.py);
    HTTP/2 needs granian."""
    if getattr(args, "http", "1") != "1" and args.server != "granian":
        parser.exit(2, f"dualproxy serve: error: --http {args.http} needs --server granian "
                       "(uvicorn and gunicorn serve HTTP/1.1 only)\n")
    if args.server == "granian":
        from .servers.granian import untested_granian

        problem = untested_granian()
        if problem is not None:
            parser.exit(2, f"dualproxy serve: error: {problem}\n")


def load_config_file(path: str, argv: Sequence[str]) -> tuple[argparse.Namespace,
                                                               list[dict[str, Any]]]:
    """`serve`'s arguments (the file's server options under argv's) and the routes'
    options, all checked (configfile.ConfigError, FlagConflict when one is bad)."""
    from .configfile import load

    return load(path, argv, build_parser, options_from_args, check_route, TOML_TYPES)


def check_route(route: dict[str, Any]) -> ProxyConfig:
    """One route's ProxyConfig from its options, everything about it checked now
    (ValueError naming the problem): the --config file's routes go through it."""
    from .http1.tls import upstream_context

    config = config_from_options(route)
    upstream_context(config)
    return config


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return cast(argparse.ArgumentParser, action.choices[name])
    return parser


def _did_you_mean(parser: argparse.ArgumentParser, word: str) -> str:
    """`; did you mean --upstream?` for `--upstrem`, as the config file's check says."""
    flags = [flag for action in parser._actions for flag in action.option_strings]
    close = difflib.get_close_matches(word.split("=", 1)[0], flags, n=1)
    return f"; did you mean {close[0]}?" if close else ""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the subcommand that was given, with a likely meaning
        command = _subparser(parser, args.command)
        command.error(f"unrecognized arguments: {' '.join(unknown)}"
                      + _did_you_mean(command, unknown[0]))
    if args.command == "serve" and args.config is not None:
        from .configfile import ConfigError, FlagConflict

        try:
            serve_args, routes = load_config_file(args.config,
                                                  list(sys.argv[1:] if argv is None else argv))
        except FlagConflict as exc:
            parser.exit(2, f"dualproxy serve: error: {exc} (see dualproxy serve --help)\n")
        except ConfigError as exc:
            parser.exit(2, f"dualproxy serve: error: {exc}\n")
        try:
            check_tls(options_from_args(serve_args))
        except ValueError as exc:
            parser.exit(2, f"dualproxy serve: error: {exc}\n")
        _check_server(parser, serve_args)
        if serve_args.metrics_bind is not None:
            _check_metrics_bind(parser, serve_args)
        return serve(serve_args, routes)
    if args.command == "demo":
        _check_server(parser, args)
    if args.command == "serve":
        if args.upstream is None:
            parser.exit(2, "dualproxy serve: error: --upstream URL is required, or --config "
                           "FILE.toml for several routes (see dualproxy serve --help)\n")
        try:
            options = options_from_args(args)
            check_tls(options, config_from_options(options))
        except ValueError as exc:  # the upstream URL, a trusted-proxy CIDR
            parser.exit(2, f"dualproxy serve: error: {exc} (see dualproxy serve --help)\n")
        _check_server(parser, args)
        if args.metrics_bind is not None:
            _check_metrics_bind(parser, args)
        return serve(args)
    return demo(args)


if __name__ == "__main__":
    sys.exit(main())
