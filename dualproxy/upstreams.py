"""Where requests can go: the upstream forms a route accepts, parsed once.

Pure (no I/O). Three forms, as nginx and Caddy users write them:

- `http://host[:port][/base]` and `https://host[:port][/base]`;
- `unix:/path/to.sock[:/base]`: HTTP/1.1 over a unix socket; Host is `localhost`
  (unless the route preserves the client's Host).

The drivers learn the chosen `Upstream` from the request extension `UPSTREAM`
(the socket path, the TLS server name); the core learns its authority and base.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

# httpx request extension carrying the chosen `Upstream` to dualproxy's transport.
UPSTREAM = "dualproxy.upstream"
# Attribute dualproxy's transport sets on the httpx exception of a failed request:
# True when not one byte of it went upstream (so resending it is always safe).
NOTHING_SENT = "dualproxy_nothing_sent"


@dataclass(frozen=True)
class Upstream:
    """One upstream server of a route.

    `origin` is what the httpx request URL is built from (a unix socket's is
    `http://localhost`, so the socket path in `socket_path` tells the driver
    where to connect); `authority` is the default Host; `base` the path prefix.
    """

    url: str = field(compare=False)
    scheme: str                      # "http", "https" or "unix"
    host: str                        # hostname or IP (no brackets); "localhost" for unix
    port: int                        # 0 for unix
    base: bytes
    authority: bytes = field(compare=False)
    origin: str = field(compare=False)
    socket_path: str | None = None
    name: str = field(default="", compare=False)  # safe display name (logs, metrics)

    def __post_init__(self) -> None:
        # The balancer hashes the chosen upstream three times a request: once here
        # instead (the same value as the hash dataclass makes of the compared fields).
        object.__setattr__(self, "_hash", hash(
            (self.scheme, self.host, self.port, self.base, self.socket_path)))

    def __hash__(self) -> int:
        value: int = self.__dict__["_hash"]  # (not typing.cast: a call a hash)
        return value

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    def __str__(self) -> str:
        return self.name or self.url


def parse_upstream(text: str) -> Upstream:
    """Parse one upstream form; ValueError naming the problem when it is not one."""
    text = text.strip()
    if text.startswith("unix:"):
        return _parse_unix(text)
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"upstream must be an http(s) URL or unix:/path.sock, got {text!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"upstream URL must not carry a query or fragment: {text!r}")
    if parts.username or parts.password:
        raise ValueError(f"upstream URL must not carry credentials: {text!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"upstream URL has a bad port: {text!r}") from None
    default_port = 443 if parts.scheme == "https" else 80
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host  # IPv6 literal
    authority = shown if port in (None, default_port) else f"{shown}:{port}"
    origin = f"{parts.scheme}://{authority}"
    return Upstream(
        url=text,
        scheme=parts.scheme,
        host=host,
        port=port or default_port,
        base=_base(parts.path, text),
        authority=authority.encode("ascii"),
        origin=origin,
        name=origin,
    )


def _parse_unix(text: str) -> Upstream:
    rest = text[len("unix:"):]
    # `unix:/run/app.sock:/base`: the base, when given, follows the last `:/`.
    path, sep, base = rest.rpartition(":/")
    if not sep:
        path, base = rest, ""
    else:
        base = "/" + base
    if not path.startswith("/") and not path.startswith("."):
        raise ValueError(f"a unix upstream needs a socket path (unix:/path.sock), got {text!r}")
    return Upstream(
        url=text,
        scheme="unix",
        host="localhost",
        port=0,
        base=_base(base, text),
        authority=b"localhost",
        origin="http://localhost",
        socket_path=path,
        name=f"unix:{path}",
    )


def _base(path: str, text: str) -> bytes:
    try:
        return path.rstrip("/").encode("ascii")
    except UnicodeEncodeError:
        raise ValueError(
            f"upstream base path must be ASCII (percent-encode it): {text!r}") from None


def parse_upstreams(value: str | Upstream | Sequence[str | Upstream]) -> tuple[Upstream, ...]:
    """One or several upstreams of one route (one pool).

    They must share one base path: the target is mapped once per request, and a
    retry on another upstream must ask for the same thing (nginx's upstream
    block has servers only; the path belongs to `proxy_pass`).
    """
    items = [value] if isinstance(value, (str, Upstream)) else list(value)
    if not items:
        raise ValueError("at least one upstream is needed")
    upstreams = tuple(u if isinstance(u, Upstream) else parse_upstream(u) for u in items)
    bases = {u.base for u in upstreams}
    if len(bases) > 1:
        raise ValueError("the upstreams of one route must share one base path, got "
                         + ", ".join(sorted(repr(b.decode()) for b in bases)))
    seen: set[Upstream] = set()
    for upstream in upstreams:
        if upstream in seen:
            raise ValueError(f"upstream {upstream.url!r} is given twice")
        seen.add(upstream)
    return upstreams
