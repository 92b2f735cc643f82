"""The one immutable configuration object both faces share.

Everything a user can tune lives here, validated once at construction, so the
per-request code can trust it without re-checking.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from .hooks import RequestHook, ResponseHook

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_TIMEOUT = 30.0
DEFAULT_IDLE_TIMEOUT = 300.0
DEFAULT_WS_MAX_SIZE = 16 * 1024 * 1024

# RFC 9110 5.1 / 5.5: a field name is a token; CR, LF and NUL never appear in a
# value (a server would refuse the head, or split it in two).
FIELD_NAME = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
BAD_FIELD_VALUE = re.compile(rb"[\x00\r\n]")


def _normalize_mount(mount: str) -> str:
    """`/api/` and `api` both mean `/api`; `` and `/` mean the root."""
    mount = mount.strip()
    if not mount or mount == "/":
        return ""
    if not mount.startswith("/"):
        mount = "/" + mount
    return mount.rstrip("/")


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
                  option: str) -> None:
    """Refuse at construction a header a server would refuse in every response."""
    for name, value in pairs:
        if not FIELD_NAME.match(name) or BAD_FIELD_VALUE.search(value):
            raise ValueError(f"{option}: invalid header {name!r}: {value!r} "
                             "(names are tokens; values carry no CR, LF or NUL)")
    for name in names:
        if not FIELD_NAME.match(name):
            raise ValueError(f"{option}: invalid header name {name!r}")


@dataclass(frozen=True)
class ProxyConfig:
    """What to forward where, and how strictly.

    `upstream` is the base URL (`http://host:port/base`); requests under `mount`
    go to the base with the mount stripped. Build it once and share it.
    """

    upstream: str
    mount: str = ""
    timeout: float = DEFAULT_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    max_body_size: int | None = None
    preserve_host: bool = False
    trusted_proxies: tuple[IPNetwork, ...] = ()
    add_request_headers: tuple[tuple[bytes, bytes], ...] = ()
    remove_request_headers: frozenset[bytes] = frozenset()
    add_response_headers: tuple[tuple[bytes, bytes], ...] = ()
    remove_response_headers: frozenset[bytes] = frozenset()
    rewrite_redirects: bool = True
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
    request_hooks: tuple[RequestHook, ...] = ()
    response_hooks: tuple[ResponseHook, ...] = ()
    # Derived fields, filled in by __post_init__.
    upstream_scheme: str = field(init=False, default="")
    upstream_authority: bytes = field(init=False, default=b"")
    upstream_origin: str = field(init=False, default="")
    upstream_base: bytes = field(init=False, default=b"")

    def __post_init__(self) -> None:
        parts = urlsplit(self.upstream)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream must be an http(s) URL, got {self.upstream!r}")
        if parts.query or parts.fragment:
            raise ValueError("upstream URL must not carry a query or fragment")
        if self.timeout <= 0 or self.idle_timeout <= 0 or self.pool_timeout <= 0:
            raise ValueError("timeouts must be positive")
        if self.ws_max_size <= 0 or (self.ws_idle_timeout is not None
                                     and self.ws_idle_timeout <= 0):
            raise ValueError("ws_max_size and ws_idle_timeout must be positive")
        if self.max_body_size is not None and self.max_body_size < 0:
            raise ValueError("max_body_size must be >= 0")
        _check_fields(self.add_request_headers, self.remove_request_headers,
                      "request headers")
        _check_fields(self.add_response_headers, self.remove_response_headers,
                      "response headers")
        default_port = 443 if parts.scheme == "https" else 80
        host = parts.hostname
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        authority = host if parts.port in (None, default_port) else f"{host}:{parts.port}"
        set_ = object.__setattr__
        set_(self, "mount", _normalize_mount(self.mount))
        set_(self, "upstream_scheme", parts.scheme)
        set_(self, "upstream_authority", authority.encode("ascii"))
        set_(self, "upstream_origin", f"{parts.scheme}://{authority}")
        set_(self, "upstream_base", parts.path.rstrip("/").encode("ascii"))
        set_(self, "trusted_proxies", _parse_networks(self.trusted_proxies))

    @classmethod
    def build(
        cls,
        upstream: str,
        *,
        trusted_proxies: Iterable[str | IPNetwork] = (),
        add_request_headers: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
        remove_request_headers: Iterable[str] = (),
        add_response_headers: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
        remove_response_headers: Iterable[str] = (),
        request_hooks: Iterable[RequestHook] = (),
        response_hooks: Iterable[ResponseHook] = (),
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
            **options,
        )

    def is_trusted(self, peer: str | None) -> bool:
        """True when the direct peer is one of the configured trusted proxies."""
        if not peer or not self.trusted_proxies:
            return False
        try:
            addr = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(addr in net for net in self.trusted_proxies)
