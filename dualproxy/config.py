"""The one immutable configuration object both faces share.

Everything a user can tune lives here, validated once at construction, so the
per-request code can trust it without re-checking.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

from .rules import HeaderRule, parse_rule, refused_name
from .target import reachable_mount
from .types import FilterLike
from .upstreams import Upstream, parse_upstreams
from .wire import BAD_FIELD_VALUE, FIELD_NAME

if TYPE_CHECKING:
    import ssl

    from .hooks import RequestHook, ResponseHook

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
# `sub_filter=`: {pattern: replacement}, or (pattern, replacement) pairs; str is UTF-8.
SubFilterTable: TypeAlias = (Mapping[str, str] | Mapping[bytes, bytes]
                             | Mapping[str | bytes, str | bytes]
                             | Iterable[tuple[str | bytes, str | bytes]])

DEFAULT_TIMEOUT = 30.0
DEFAULT_IDLE_TIMEOUT = 300.0
DEFAULT_CLIENT_TIMEOUT = 60.0  # nginx's client_body_timeout
DEFAULT_WS_MAX_SIZE = 16 * 1024 * 1024
# The longest timeout accepted, about 11.6 days: any longer one overflows somewhere
# (a poll() in milliseconds is a C int: 24.8 days; socket timeouts, event waits).
MAX_TIMEOUT = 1_000_000.0
# A mount is matched on the raw target, which is ASCII: printable, no space.
_MOUNT_TEXT = re.compile(r"[!-~]*\Z")
BALANCE_POLICIES = ("least-conn", "round-robin", "random")


def check_mount(mount: str, what: str = "mount") -> None:
    """A mount (or health path) is ASCII without space or control: a request target
    is, so a `/日本` mount could never match one; its percent-encoded form can."""
    if not _MOUNT_TEXT.match(mount.strip()):
        from urllib.parse import quote

        raise ValueError(f"{what} {mount!r} must be ASCII without spaces or control "
                         f"characters, as a request target is: percent-encode it "
                         f"({quote(mount.strip(), safe='/')!r})")


def check_timeout(seconds: float, what: str) -> None:
    """A timeout is positive and at most MAX_TIMEOUT (ValueError naming `what`)."""
    if not 0 < seconds <= MAX_TIMEOUT:  # NaN fails both
        raise ValueError(f"{what} must be more than 0 and at most {MAX_TIMEOUT:.0f} "
                         f"seconds, got {seconds!r}")


def _normalize_mount(mount: str) -> str:
    """`/api/` and `api` both mean `/api`; `` and `/` mean the root."""
    check_mount(mount)
    mount = mount.strip()
    if not mount or mount == "/":
        return ""
    if not mount.startswith("/"):
        mount = "/" + mount
    mount = mount.rstrip("/")

    if not reachable_mount(mount.encode("ascii")):
        raise ValueError(f"mount {mount!r} could never be routed: backends read it "
                         "differently (dot segments, repeated slashes, `\\`, `;params`), "
                         "so every request under it would be a 400; write the path they read")
    return mount


def _parse_networks(values: Iterable[str | IPNetwork]) -> tuple[IPNetwork, ...]:
    nets: list[IPNetwork] = []
    for value in values:
        if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            nets.append(value)
        else:
            nets.append(ipaddress.ip_network(value.strip(), strict=False))
    return tuple(nets)


def _field_bytes(text: str, what: str) -> bytes:
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"{what} {text!r} is not latin-1 text") from None


def _header_pairs(
    headers: Mapping[str, str] | Sequence[tuple[str, str]] | None,
) -> tuple[tuple[bytes, bytes], ...]:
    if not headers:
        return ()
    items = headers.items() if isinstance(headers, Mapping) else headers
    return tuple(
        (_field_bytes(name.strip().lower(), "header name"), _field_bytes(value, "header value"))
        for name, value in items
    )


def _header_names(names: Iterable[str]) -> frozenset[bytes]:
    return frozenset(_field_bytes(name.strip().lower(), "header name") for name in names)


def _check_fields(pairs: Iterable[tuple[bytes, bytes]], names: Iterable[bytes],
                  option: str, direction: str) -> None:
    """Refuse at construction a header a server would refuse in every response, and
    an added field no header rule may add (framing, hop-by-hop: the one rule of
    rules.py)."""
    for name, value in pairs:
        if not FIELD_NAME.match(name) or BAD_FIELD_VALUE.search(value):
            raise ValueError(f"{option}: invalid header {name!r}: {value!r} "
                             "(names are tokens; values carry no CR, LF or NUL)")
        refused = refused_name(name, direction, "add")
        if refused is not None:
            raise ValueError(f"{option}: {refused}")
    for name in names:
        if not FIELD_NAME.match(name):
            raise ValueError(f"{option}: invalid header name {name!r}")


@dataclass(frozen=True)
class ProxyConfig:
    """What to forward where, and how strictly.

    `upstream` is the base URL (`http://host:port/base`, `https://...`,
    `unix:/path.sock[:/base]`) or several of them (one balanced pool sharing one
    base path); requests under `mount` go to the base with the mount stripped.
    Build it once and share it.
    """

    upstream: str | Sequence[str]
    mount: str = ""
    timeout: float = DEFAULT_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    # The longest wait for the client's next request-body bytes (core.client_stalled).
    client_timeout: float = DEFAULT_CLIENT_TIMEOUT
    max_body_size: int | None = None
    preserve_host: bool = False
    trusted_proxies: tuple[IPNetwork, ...] = ()
    add_request_headers: tuple[tuple[bytes, bytes], ...] = ()
    remove_request_headers: frozenset[bytes] = frozenset()
    add_response_headers: tuple[tuple[bytes, bytes], ...] = ()
    remove_response_headers: frozenset[bytes] = frozenset()
    rewrite_redirects: bool = True
    # Forward request header names containing `_` (nginx's underscores_in_headers);
    # off, they are dropped: a WSGI upstream reads X_Forwarded_For as X-Forwarded-For.
    underscores_in_headers: bool = False
    rewrite_cookie_path: bool = False
    cookie_domain: str | None = None
    max_connections: int = 100
    max_keepalive_connections: int = 100
    pool_timeout: float = 5.0
    max_header_count: int = 100
    max_header_bytes: int = 32768
    max_target_bytes: int = 8000
    chunk_size: int = 65536
    # WebSocket: the largest message either way (then close 1009), and the silence
    # allowed on an open socket (None: no limit; pings keep a dead peer detected).
    ws_max_size: int = DEFAULT_WS_MAX_SIZE
    ws_idle_timeout: float | None = None
    # Several upstreams: how to pick (least-conn, ties round-robin; round-robin;
    # random = the better of two random choices), passive health as nginx
    # (max_fails failures within fail_timeout: skipped for fail_timeout), active
    # checks when health_path is set, retries on another upstream where safe.
    balance: str = "least-conn"
    max_fails: int = 1
    fail_timeout: float = 10.0
    retries: int = 2
    health_path: str | None = None
    health_interval: float = 5.0
    # TLS to https upstreams, httpx's names: verify (True: system CAs; a CA bundle
    # path; False: no verification; or an ssl.SSLContext) and cert (a PEM path
    # with the key, or (certfile, keyfile)) for mutual TLS.
    verify: bool | str | ssl.SSLContext = True
    cert: str | tuple[str, str] | None = None
    request_hooks: tuple[RequestHook, ...] = ()
    response_hooks: tuple[ResponseHook, ...] = ()
    # The HTTP cache (filters/cache/): RFC 9111 shared cache in front of the upstream,
    # bounded by bytes (LRU), responses over cache_max_object bytes not stored;
    # responses with Set-Cookie are stored only when cache_set_cookie says so.
    cache: bool = False
    # memory, sqlite:PATH (the workers of a machine) or redis://host:port/db (many machines)
    cache_store: str = "memory"
    cache_max_size: int = 256 * 1024 * 1024
    cache_max_object: int = 64 * 1024 * 1024
    cache_set_cookie: bool = False
    # Peers allowed to PURGE a URL from the cache (besides trusted_proxies); others get 405.
    cache_purge_from: tuple[IPNetwork, ...] = ()
    # The route's own filters (filters/base.py), outermost first, after the built-in
    # ones and before the hooks (filters.build_chain).
    filters: tuple[FilterLike, ...] = ()
    # Rate limits (filters/ratelimit.py): `rate_limit` "N/second" (minute, hour) refills
    # a bucket of `rate_burst` requests (default N), one per `rate_key` (client, route,
    # header:NAME); past it 429. `rate_max_inflight`: requests in flight per key (per
    # worker). `rate_limit_store`: memory (per worker) or a redis:// URL (shared).
    rate_limit: str | None = None
    rate_burst: int | None = None
    rate_key: str = "client"
    rate_max_inflight: int | None = None
    rate_limit_store: str = "memory"
    # Built-in filters (filters/header_rules.py, request_id.py, forwarded_prefix.py):
    # header rules each way ('Name: value' sets, '+Name: value' adds, '-Name' removes),
    # X-Request-ID (off by default), X-Forwarded-Prefix (None: on when `mount` is
    # set; True: also for a host app's mount; False: off).
    header_up: tuple[HeaderRule, ...] = ()
    header_down: tuple[HeaderRule, ...] = ()
    request_id: bool = False
    forwarded_prefix: bool | None = None
    # Text replacement in response bodies, nginx's sub_filter (filters/transforms.py
    # SubFilter): (pattern, replacement) pairs, and the media types rewritten
    # (empty: text/html). The chain runs it after the built-in filters.
    sub_filter: tuple[tuple[bytes, bytes], ...] = ()
    sub_filter_types: tuple[str, ...] = ()
    # Compress response bodies (filters/compress.py): True for the defaults, or a
    # `Compression(min_length=, types=, codings=)`.
    compress: bool | Compression = False
    # OpenTelemetry tracing (filters/tracing.py, the `tracing` extra): a SERVER span
    # per request, a CLIENT span per upstream try, W3C trace context continued from
    # trusted proxies only (never with tracing_new_traces) and sent upstream.
    # `tracer_provider`: an opentelemetry TracerProvider (None: the global one,
    # which `dualproxy serve` sets up from the OTEL_* variables in each worker).
    tracing: bool = False
    tracing_new_traces: bool = False
    tracer_provider: Any = field(default=None, compare=False)
    # Derived fields, filled in by __post_init__.
    upstreams: tuple[Upstream, ...] = field(init=False, default=())
    upstream_scheme: str = field(init=False, default="")
    upstream_authority: bytes = field(init=False, default=b"")
    upstream_origin: str = field(init=False, default="")
    upstream_base: bytes = field(init=False, default=b"")

    def __post_init__(self) -> None:
        upstreams = parse_upstreams(self.upstream)
        first = upstreams[0]
        for what in ("timeout", "idle_timeout", "client_timeout", "pool_timeout",
                     "fail_timeout", "health_interval"):
            check_timeout(getattr(self, what), what)
        if self.ws_idle_timeout is not None:  # None: no limit
            check_timeout(self.ws_idle_timeout, "ws_idle_timeout")
        if self.ws_max_size <= 0:
            raise ValueError("ws_max_size must be positive")
        if self.max_body_size is not None and self.max_body_size < 0:
            raise ValueError("max_body_size must be >= 0")
        if self.cache_max_size < 1 or self.cache_max_object < 1:
            raise ValueError("cache_max_size and cache_max_object must be at least 1 byte")
        check_store(self.cache_store)
        _check_fields(self.add_request_headers, self.remove_request_headers,
                      "request headers", "up")
        _check_fields(self.add_response_headers, self.remove_response_headers,
                      "response headers", "down")
        set_ = object.__setattr__
        set_(self, "header_up", _header_rules(self, "up"))
        set_(self, "header_down", _header_rules(self, "down"))
        set_(self, "upstream", first.url if len(upstreams) == 1
             else tuple(u.url for u in upstreams))
        set_(self, "upstreams", upstreams)
        _check_pool_options(self)
        from .rates import Limits

        Limits.from_config(self)  # ValueError naming a bad rate option
        _check_sub_filter(self)
        _check_compress(self.compress)
        if self.tracing:
            _check_tracing()
        set_(self, "mount", _normalize_mount(self.mount))
        # The first upstream's, for code that knows one upstream only.
        set_(self, "upstream_scheme", first.scheme)
        set_(self, "upstream_authority", first.authority)
        set_(self, "upstream_origin", first.origin)
        set_(self, "upstream_base", first.base)
        set_(self, "trusted_proxies", _parse_networks(self.trusted_proxies))
        set_(self, "cache_purge_from", _parse_networks(self.cache_purge_from))

    @classmethod
    def build(
        cls,
        upstream: str | Sequence[str],
        *,
        trusted_proxies: Iterable[str | IPNetwork] = (),
        add_request_headers: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
        remove_request_headers: Iterable[str] = (),
        add_response_headers: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
        remove_response_headers: Iterable[str] = (),
        request_hooks: Iterable[RequestHook] = (),
        response_hooks: Iterable[ResponseHook] = (),
        filters: Iterable[FilterLike] = (),
        sub_filter: SubFilterTable = (),
        sub_filter_types: Iterable[str] = (),
        **options: Any,
    ) -> ProxyConfig:
        """Friendly constructor: accepts strings, mappings and iterables."""
        return cls(
            upstream=upstream,
            trusted_proxies=_parse_networks(trusted_proxies),
            add_request_headers=_header_pairs(add_request_headers),
            remove_request_headers=_header_names(remove_request_headers),
            add_response_headers=_header_pairs(add_response_headers),
            remove_response_headers=_header_names(remove_response_headers),
            request_hooks=tuple(request_hooks),
            response_hooks=tuple(response_hooks),
            filters=tuple(filters),
            sub_filter=_sub_pairs(sub_filter),
            sub_filter_types=tuple(sub_filter_types),
            **options,
        )

    def is_trusted(self, peer: str | None) -> bool:
        """True when the direct peer is one of the configured trusted proxies."""
        return _within(peer, self.trusted_proxies)

    def may_purge(self, peer: str | None) -> bool:
        """May the direct peer PURGE cached URLs (cache_purge_from, trusted proxies)?"""
        return _within(peer, self.cache_purge_from) or self.is_trusted(peer)


def _within(peer: str | None, networks: tuple[IPNetwork, ...]) -> bool:
    if not peer or not networks:
        return False
    try:
        addr = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(addr in net for net in networks)


def _header_rules(config: ProxyConfig, direction: str) -> tuple[HeaderRule, ...]:
    """`header_up`/`header_down` parsed and checked (strings or HeaderRules)."""
    key = f"header_{direction}"
    written: Any = getattr(config, key)
    if isinstance(written, str):
        written = (written,)
    rules = tuple(parse_rule(rule, direction) for rule in written)
    for rule in rules:
        if "request_id" in rule.variables and not config.request_id:
            raise ValueError(f"{key} rule {str(rule)!r} uses {{request_id}}, but request ids "
                             "are off: turn them on (--request-id, request_id = true, "
                             "request_id=True)")
    return rules


def _sub_pairs(pairs: SubFilterTable) -> tuple[tuple[bytes, bytes], ...]:
    items = pairs.items() if isinstance(pairs, Mapping) else pairs
    return tuple((_text_bytes(src), _text_bytes(dst)) for src, dst in items)


def _text_bytes(value: str | bytes) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def check_types(types: Iterable[str] | str) -> tuple[str, ...]:
    """Media types as a filter matches them, lower-cased (ValueError when malformed)."""
    if isinstance(types, str):
        types = (types,)
    out = tuple(t.strip().lower() for t in types)
    for t in out:
        if t.count("/") != 1 or not all(t.split("/")) or t.startswith("*/") and t != "*/*":
            raise ValueError(f"a media type is 'type/subtype' or 'type/*', got {t!r}")
    return out


def _check_sub_filter(config: ProxyConfig) -> None:
    """The sub_filter table and types, by the rules SubFilter applies (ValueError);
    checked here so that config needs no filter (filters/transforms.py imports it)."""
    if config.sub_filter_types and not config.sub_filter:
        raise ValueError("sub_filter_types needs sub_filter (the patterns to replace)")
    try:
        if any(not pattern for pattern, _ in config.sub_filter):
            raise ValueError("a replacement's pattern must not be empty")
        check_types(config.sub_filter_types)
    except ValueError as exc:
        raise ValueError(f"sub_filter: {exc}") from None


def _check_tracing() -> None:
    """Tracing needs the OpenTelemetry API (the `tracing` extra): ValueError otherwise."""
    if importlib.util.find_spec("opentelemetry") is None \
            or importlib.util.find_spec("opentelemetry.trace") is None:
        raise ValueError("tracing needs OpenTelemetry: pip install 'dualproxy[tracing]'")


def _check_compress(setting: object) -> None:
    if not isinstance(setting, (bool, Compression)):
        raise ValueError(f"compress must be True, False or a Compression, "
                         f"got {type(setting).__name__}")


def check_store(spec: str) -> None:
    """A `cache_store` value is `memory`, `sqlite:PATH` or `redis://host:port/db`
    (ValueError naming it; filters/cache/ builds the store it names)."""
    if spec == "memory" or (spec.startswith("sqlite:") and len(spec) > len("sqlite:")):
        return
    if spec.startswith(("redis://", "rediss://", "unix://")):
        try:
            import redis  # noqa: F401 - the `redis` extra
        except ImportError:
            raise ValueError(f"cache_store {spec!r} needs redis-py: "
                             "pip install 'dualproxy[redis]'") from None
        return
    raise ValueError("cache_store must be 'memory', 'sqlite:PATH' or "
                     f"'redis://host:port/db', got {spec!r}")


def _check_pool_options(config: ProxyConfig) -> None:
    if config.balance not in BALANCE_POLICIES:
        raise ValueError(f"balance must be one of {', '.join(BALANCE_POLICIES)}, "
                         f"got {config.balance!r}")
    if config.max_fails < 0 or config.retries < 0:
        raise ValueError("max_fails and retries must be >= 0")
    if config.health_path is not None:
        if not config.health_path.startswith("/"):
            raise ValueError(f"health_path must start with '/', got {config.health_path!r}")
        check_mount(config.health_path, "health_path")
    if config.cert is not None and not any(u.tls for u in config.upstreams):
        raise ValueError("cert (mutual TLS) needs an https upstream")


# -- compression settings (the filter: filters/compress.py) --------------------------------

#: Compressed when the body is at least this long (bytes), if its length is known.
#: Below about a kilobyte the saving is a few hundred bytes at most, and the
#: response fits one TCP segment either way (nginx's docs suggest 1000; Caddy's
#: default is 512).
DEFAULT_MIN_LENGTH = 1024

#: The media types compressed by default (the type without its parameters):
#: text, and the structured and script types that are text underneath. `type/*`
#: matches a whole type, `type/*+suffix` a structured-syntax suffix (RFC 6838 4.2.8).
DEFAULT_TYPES: tuple[str, ...] = (
    "text/*",                        # html, css, plain, csv, event-stream, javascript...
    "application/json", "application/*+json", "application/x-ndjson",
    "application/javascript", "application/x-javascript", "application/ecmascript",
    "application/xml", "application/*+xml",   # xhtml, rss, atom, soap...
    "image/svg+xml", "image/x-icon", "image/vnd.microsoft.icon", "image/bmp",
    "application/wasm",
    "application/yaml", "application/toml", "application/x-www-form-urlencoded",
    "application/rtf", "application/x-sh", "application/graphql",
    "font/ttf", "font/otf", "application/vnd.ms-fontobject",  # woff/woff2 are compressed
)

#: Our preference among codings a client accepts equally (RFC 9110 leaves ties to
#: the server): zstd compresses fastest, br best for the same time, gzip everywhere.
PREFERENCE: tuple[str, ...] = ("zstd", "br", "gzip")


@dataclass(frozen=True)
class Compression:
    """What `compress=` accepts besides True (the defaults below).

    `min_length`: bodies whose Content-Length is smaller pass uncompressed (a body
    without one, streamed, is compressed). `types`: the media types compressed
    (`text/*`, `application/*+json` patterns allowed). `codings`: the codings
    offered, in our order of preference for ties; one this process cannot encode
    (br without `brotli`, zstd without `zstandard`) is never offered.
    """

    min_length: int = DEFAULT_MIN_LENGTH
    types: Sequence[str] = DEFAULT_TYPES
    codings: Sequence[str] = PREFERENCE

    def __post_init__(self) -> None:
        if isinstance(self.min_length, bool) or not isinstance(self.min_length, int) \
                or self.min_length < 0:
            raise ValueError(f"compress min_length must be an integer >= 0, "
                             f"got {self.min_length!r}")
        for what, values in (("types", self.types), ("codings", self.codings)):
            if isinstance(values, str):
                raise ValueError(f"compress {what} must be a list of strings, not one string")
        if not all(isinstance(v, str) for v in (*self.types, *self.codings)):
            raise ValueError("compress types and codings must be lists of strings")
        unknown = [c for c in self.codings if c.strip().lower() not in PREFERENCE]
        if unknown:
            raise ValueError(f"compress codings: {', '.join(map(repr, unknown))} unknown "
                             f"(known: {', '.join(PREFERENCE)})")
        for pattern in self.types:
            if pattern.count("/") != 1 or not all(pattern.split("/")):
                raise ValueError(f"compress types: {pattern!r} is not a media type "
                                 "(type/subtype, type/* or type/*+suffix)")
        object.__setattr__(self, "types", tuple(t.strip().lower() for t in self.types))
        object.__setattr__(self, "codings", tuple(c.strip().lower() for c in self.codings))
