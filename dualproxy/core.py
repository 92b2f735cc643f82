"""The shared core: one neutral request in, one upstream plan out.

No I/O and no framework imports. A face describes what its server received as
an `IncomingRequest`; `plan_request` decides everything about the upstream call
(target, headers, framing, timeouts) and `plan_response` everything about the
head sent back. The faces only move bytes. Building the `httpx.Request` is also
here because it is pure and the same for both faces.
"""

from __future__ import annotations

import functools
import http.cookiejar
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import MISSING, dataclass, fields
from http import HTTPStatus
from typing import Any, Final, TypeVar

import httpx

from .config import ProxyConfig
from .errors import (
    BadGateway,
    BadRequest,
    BodyTooLarge,
    ClientTimeout,
    IncompleteBody,
    MountRedirect,
)
from .framing import Framing, FramingError, parse_framing
from .headers import Header, check_request_headers, response_fields, upstream_fields
from .target import mount_redirect, target_authority, upstream_target
from .upstreams import NOTHING_SENT, UPSTREAM, Upstream

T = TypeVar("T")

# The methods the framework glue routes to the proxy (Flask and FastAPI routes need
# an explicit list): RFC 9110's (CONNECT aside: no tunnels) and PATCH, then WebDAV
# and its extensions (RFC 4918, 3253, 3648, 3744, 4791, 5323, 5842).
PROXY_METHODS: tuple[str, ...] = (
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE",
    "PROPFIND", "PROPPATCH", "MKCOL", "COPY", "MOVE", "LOCK", "UNLOCK", "REPORT",
    "SEARCH", "MKCALENDAR", "ACL", "BIND", "UNBIND", "REBIND", "VERSION-CONTROL",
    "CHECKOUT", "CHECKIN", "UNCHECKOUT", "MERGE", "LABEL", "UPDATE", "BASELINE-CONTROL",
    "MKWORKSPACE", "MKACTIVITY", "ORDERPATCH",
)


def quick_init(cls: type[T]) -> type[T]:
    """A frozen dataclass made per request, given an `__init__` that stores its
    fields in the instance's `__dict__` directly: the generated one goes through
    `object.__setattr__` once a field (three times the cost of the whole rest).
    The same signature and defaults; the instance is as frozen as before."""
    params, body, defaults = [], [], {}
    for field in fields(cls):  # type: ignore[arg-type]
        if field.default_factory is not MISSING or not field.init:
            raise TypeError(f"quick_init: {cls.__name__}.{field.name} is not a plain field")
        if field.default is MISSING:
            params.append(field.name)
        else:
            defaults[f"_default_{field.name}"] = field.default
            params.append(f"{field.name}=_default_{field.name}")
        body.append(f"    d[{field.name!r}] = {field.name}\n")
    namespace: dict[str, Any] = {}
    exec(f"def __init__(self, {', '.join(params)}):\n    d = self.__dict__\n{''.join(body)}",
         defaults, namespace)
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__doc__ = cls.__init__.__doc__
    setattr(cls, "__init__", init)  # noqa: B010 (mypy refuses assigning a method)
    return cls


@quick_init
@dataclass(frozen=True)
class IncomingRequest:
    """What the front server received, in neutral form.

    `target` is the raw request-target (path and query as sent, still encoded);
    `headers` are lower-cased names with raw values, in arrival order; `mount`
    is the prefix the host application already routed on (ASGI `root_path`,
    WSGI `SCRIPT_NAME`), used when the config names none.
    """

    method: str
    target: bytes
    headers: tuple[Header, ...] | list[Header]
    peer: str | None
    scheme: str = "http"
    mount: bytes = b""
    http_version: str = "1.1"


@quick_init
@dataclass(frozen=True)
class UpstreamPlan:
    """Everything about the upstream request except its body bytes."""

    method: str
    target: bytes
    headers: list[Header]
    content_length: int | None   # declared length, or None
    has_body: bool               # False: no body and no framing header at all
    mount: bytes                 # the mount that matched, for rewriting the way back
    incoming: IncomingRequest


@quick_init
@dataclass(frozen=True)
class ResponseHead:
    """The status and headers to send to the client."""

    status: int
    headers: list[Header]
    has_body: bool
    # The upstream's Date field (the front server sends its own): what a cache ages
    # the response by (RFC 9111 4.2.3). None: none, or not an upstream's answer.
    date: bytes | None = None

    @property
    def closes(self) -> bool:
        """Does this head end its connection (`Connection: close`)?"""
        return any(name == b"connection" and b"close" in value.lower()
                   for name, value in self.headers)

    @property
    def status_line(self) -> str:
        """WSGI's `"200 OK"` form."""
        line = _STATUS_LINES.get(self.status)
        if line is None:
            try:
                phrase = HTTPStatus(self.status).phrase
            except ValueError:
                phrase = "Unknown"
            line = _STATUS_LINES[self.status] = f"{self.status} {phrase}"
        return line


_STATUS_LINES: dict[int, str] = {}  # status_line's, made once a status (three digits)


def plan_request(config: ProxyConfig, incoming: IncomingRequest,
                 routes: Sequence[bytes] = ()) -> UpstreamPlan:
    """Decide the upstream request. Raises a ProxyError (400/404/413/414/431, and
    301/308 for the mount without its slash).

    `routes`: the mounts of every route of the app this proxy is one route of
    (router.py), so the one routing rule (`target.choose_mount`) sees them all.
    """
    return build_plan(config, incoming, check_request(config, incoming, routes))


# What `check_request` found, all `build_plan` needs besides the request: (the mount,
# the upstream target, the declared length, chunked?, an absolute-form target's
# authority, the names the Connection header lists). A plain tuple: made for every
# request.
CheckedRequest = tuple[bytes, bytes, "int | None", bool, "bytes | None", frozenset[bytes]]
CHECKED_MOUNT: Final = 0
CHECKED_LENGTH: Final = 2
CHECKED_CHUNKED: Final = 3


def check_request(config: ProxyConfig, incoming: IncomingRequest,
                  routes: Sequence[bytes] = ()) -> CheckedRequest:
    """`plan_request`'s every refusal, and nothing built: the faces run it before
    the filters, and build the plan (`build_plan`) only when something asks for it
    (a cache hit never does)."""
    version = incoming.http_version
    if version == "0.9":
        # A request line without a version (httptools takes `GET /x` followed by
        # a bare LF, header lines and all): never forwarded as an HTTP/1.1 request.
        raise BadRequest("HTTP/0.9 requests are not proxied")
    headers = incoming.headers
    check_request_headers(headers, config, require_host=version == "1.1")
    raw = incoming.target
    # The proxy's own mount, else the one the host application routed on.
    mount = config.mount.encode("latin-1") if config.mount else incoming.mount
    target = upstream_target(raw, mount, config.upstream_base, config.max_target_bytes, routes)
    if config.mount:  # a mount the proxy owns (an app's own routing is the app's)
        location = mount_redirect(raw, mount)
        if location is not None:
            raise MountRedirect(location, incoming.method)
    try:  # the one framing rule (RFC 9112 6.3): both headers, a coding other than
        # `chunked` or a bad length is smuggling material, refused rather than guessed
        framing = parse_framing(headers)
    except FramingError as exc:
        raise BadRequest(f"the request's framing is refused: {exc}") from None
    content_length = framing.length
    limit = config.max_body_size
    if content_length is not None and limit is not None and content_length > limit:
        raise BodyTooLarge(f"request body larger than {limit} bytes")
    # RFC 9112 3.2.2: an absolute-form target's authority, not Host, names the host
    # the client asked for (for preserve_host and X-Forwarded-Host alike).
    authority = None if raw[:1] == b"/" else target_authority(raw)
    return mount, target, content_length, framing.chunked, authority, framing.connection


def build_plan(config: ProxyConfig, incoming: IncomingRequest,
               checked: CheckedRequest) -> UpstreamPlan:
    """The upstream request of a request `check_request` passed (raises nothing)."""
    mount, target, content_length, chunked, authority, named = checked
    headers = upstream_fields(incoming.headers, config, incoming.peer, incoming.scheme,
                              authority, named)
    # RFC 9112 6.1/6.2: a length is forwarded as sent; anything else streams
    # chunked; no framing header at all when the client sent no body.
    if content_length is not None:
        headers.append((b"content-length", str(content_length).encode()))
    elif chunked:
        headers.append((b"transfer-encoding", b"chunked"))
    # (positional: the fields' order; a keyword call costs more, once a request)
    return UpstreamPlan(incoming.method, target, headers, content_length,
                        chunked or content_length is not None, mount, incoming)


def plan_response(
    config: ProxyConfig, plan: UpstreamPlan, status: int, headers: list[Header],
    framing: Framing | None = None, spelled: bool = False,
) -> ResponseHead:
    """Decide the head sent to the client. Raises BadGateway on ambiguous framing.

    `framing`: `parse_framing(headers)` when the caller has it already (dualproxy's
    transport read the head by it), else it is parsed here. `spelled`: the names
    are as the wire spelled them, not lower-cased yet (`response_fields`).
    """
    if status < 200:
        # Interim answers are skipped below the core; one that gets here is a 101:
        # the upstream switched protocols unasked (Upgrade never crosses the
        # proxy), and relaying it would leave the client on a dead connection.
        raise BadGateway(f"the upstream answered {status} to a request that asked no upgrade")
    out, date = response_fields(headers, config, plan.mount, framing, spelled)
    if status == 204 or status == 304:
        # RFC 9110 8.6 forbids Content-Length on 204 and makes it optional on 304;
        # uvicorn would also wait for that many body bytes that never come.
        return ResponseHead(status, [(n, v) for n, v in out if n != b"content-length"],
                            False, date)
    return ResponseHead(status, out, plan.method != "HEAD", date)  # (positional: quicker)


class BodyCounter:
    """Counts request body bytes as they stream: 413 past the limit, 400 if short."""

    __slots__ = ("expected", "limit", "received")

    def __init__(self, plan: UpstreamPlan, config: ProxyConfig) -> None:
        self.expected = plan.content_length
        self.limit = config.max_body_size
        self.received = 0

    def feed(self, size: int) -> None:
        self.received += size
        if self.limit is not None and self.received > self.limit:
            raise BodyTooLarge(f"request body larger than {self.limit} bytes")
        if self.expected is not None and self.received > self.expected:
            raise IncompleteBody("request body longer than its Content-Length")

    def remaining(self) -> int | None:
        return None if self.expected is None else self.expected - self.received

    def finish(self) -> None:
        if self.expected is not None and self.received != self.expected:
            raise IncompleteBody("request body shorter than its Content-Length")


def client_stalled(seconds: float) -> ClientTimeout:
    """The rule for a client that sent no request-body bytes for `client_timeout`
    seconds (nginx's client_body_timeout: the longest wait for one read, not a
    bound on the whole upload): the face raises this out of its body read, which
    aborts the upstream request (a cut upload is never completed upstream). Nothing
    was answered yet (the body is only read before the upstream's head), so the
    client gets 408 and its connection closes; a face that had answered already
    would abort the connection instead, as for any error after the head."""
    return ClientTimeout(f"the client sent no request body bytes for {seconds:g} s")


# The most unread request body a face reads and drops before an early answer.
DISCARD_BODY_LIMIT = 1 << 20


def discard_budget(counter: BodyCounter, closing: bool) -> int | None:
    """Unread request-body bytes to read and drop before an answer given after the
    upload began (an upstream failure before its head), by `_budget`'s rule; None
    when none is left."""
    remaining = counter.remaining()
    return None if remaining == 0 else _budget(remaining, closing)


def early_discard(incoming: IncomingRequest, closing: bool,
                  framing: tuple[int | None, bool] | None = None) -> int | None:
    """Unread request-body bytes to read and drop before an answer given before
    the upload began (a refusal, a 429, a filter's own answer); None when the
    request has no body; 0: not to be read (the server drops it or closes).
    `framing`: the checked request's (content length, chunked) when check_request
    already parsed it (a filter's answer), else parsed here (a refusal may come
    before or from that check)."""
    if framing is None:
        try:
            parsed = parse_framing(incoming.headers)
        except FramingError:  # never read by a guess: the connection closes
            return 0
        length, chunked = parsed.length, parsed.chunked
    else:
        length, chunked = framing
    if length is None and not chunked:
        return None
    if any(name == b"expect" for name, _ in incoming.headers):
        # RFC 9110 10.1.1: the client waits for 100 Continue before it sends the
        # body; reading it would ask for what is about to be refused.
        return 0
    return _budget(length, closing)


def _budget(remaining: int | None, closing: bool) -> int:
    """The rule: an answer that keeps the connection first swallows the rest of a
    modest body (nginx's discarded request body), so the next request on it is
    read in step. Not every server does it for us: uvicorn does; gunicorn drains a
    little and then drops the connection unannounced; granian (hyper) closes it
    unannounced just after the answer, and a keep-alive client's next request
    meets a closed socket. An answer that closes (a refused request, a stop) and a
    body past DISCARD_BODY_LIMIT are left unread (0). `remaining` None: chunked,
    read up to its last chunk within the limit."""
    if closing:
        return 0
    if remaining is None:
        return DISCARD_BODY_LIMIT
    return remaining if remaining <= DISCARD_BODY_LIMIT else 0


def timeouts(config: ProxyConfig) -> dict[str, float]:
    """httpcore's per-request timeout dict.

    `read` starts as `timeout` (the wait for the response head) and is switched
    to `idle_timeout` by `enter_body_phase` once the head is in: httpcore looks
    the value up on every read, so a quiet SSE stream outlives `timeout`.
    """
    return {
        "connect": config.timeout,
        "read": config.timeout,
        "write": config.idle_timeout,
        "pool": config.pool_timeout,
    }


def enter_body_phase(request: httpx.Request | Any, config: ProxyConfig) -> None:
    """The head is in: reads wait up to `idle_timeout` from now on (`request`: an
    httpx.Request, or anything with its `extensions`, as the transport's Call)."""
    timeout = request.extensions.get("timeout")
    if isinstance(timeout, dict):
        timeout["read"] = config.idle_timeout


def _fast_headers_work() -> bool:
    """Does httpx keep its headers as we build them below (a list of (raw name,
    lower-cased name, value), as every release since 0.18 does)? Checked once."""
    sample = [(b"Host", b"a"), (b"x-b", b"\xff c")]
    try:
        made = httpx.Headers()
        made._list = [(name, name.lower(), value) for name, value in sample]
        return (httpx.Headers(sample)._list == made._list and made.raw == sample
                and httpx.Headers(made).raw == sample and made.get("x-b") is not None)
    except Exception:  # another httpx: its own constructor, always
        return False


_FAST_HEADERS = _fast_headers_work()
_BYTES_ONLY = {bytes}


def byte_headers(fields: list[Header]) -> httpx.Headers:
    """`httpx.Headers(fields)` for a list of byte pairs, without httpx's normalising
    of each field (two calls and their type checks a field: most of what building
    a request or a response costs). Anything but exact bytes goes the usual way."""
    if (_FAST_HEADERS and set(map(type, [name for name, _ in fields])) == _BYTES_ONLY
            and set(map(type, [value for _, value in fields])) == _BYTES_ONLY):
        headers = httpx.Headers()
        headers._list = [(name, name.lower(), value) for name, value in fields]
        return headers
    return httpx.Headers(fields)


@functools.lru_cache(maxsize=64)
def _origin_url(origin: str) -> httpx.URL:
    # Parsing a URL costs httpx tens of microseconds; the origin never changes.
    return httpx.URL(origin)


# RFC 9110 9.2.2: methods whose repetition has the effect of one request.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Failures before the response head that count against an upstream (passive
# health) and may be retried elsewhere: no connection, a timeout, a connection
# broken or garbled before the head. Not a pool timeout (ours), not the client's
# body (LocalProtocolError), never an upstream's 4xx/5xx answer.
UPSTREAM_FAILURES: tuple[type[Exception], ...] = (
    httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadTimeout, httpx.WriteTimeout,
    httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError,
    OSError, TimeoutError)  # the WebSocket handshake's client raises these


def upstream_failed(exc: BaseException) -> bool:
    """Does `exc` (raised before the response head) count as the upstream's failure?"""
    return isinstance(exc, UPSTREAM_FAILURES)


def may_retry(plan: UpstreamPlan, exc: BaseException) -> bool:
    """May a request that failed with `exc` before any response head go to another
    upstream? Only if not one byte of it was sent (connect refused or failed, a
    reused connection closed before anything went out), or if it is idempotent
    and bodiless: a body that started to go upstream is never sent twice."""
    if not upstream_failed(exc):
        return False
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)) \
            or getattr(exc, NOTHING_SENT, False):
        return True
    return not plan.has_body and plan.method in IDEMPOTENT_METHODS


def attempt_headers(config: ProxyConfig, plan: UpstreamPlan,
                    upstream: Upstream) -> list[Header]:
    """The plan's headers for an attempt on `upstream`: the Host the core wrote
    for the pool (the first upstream's authority) becomes this upstream's own,
    unless the route preserves the client's Host. Hooks ran once, on the plan."""
    first = config.upstream_authority
    if config.preserve_host or upstream.authority == first:
        return plan.headers
    own = upstream.authority
    return [(name, own) if name == b"host" and value == first else (name, value)
            for name, value in plan.headers]


def build_request(
    config: ProxyConfig,
    plan: UpstreamPlan,
    content: Iterable[bytes] | AsyncIterable[bytes] | None,
    upstream: Upstream | None = None,
) -> httpx.Request:
    """The httpx request for a plan, with exactly the plan's headers and target.

    `upstream`: the one chosen from the route's pool (default: the first); it
    rides in the `UPSTREAM` extension for dualproxy's transport (unix socket
    path, TLS server name).

    httpx would add Host, Content-Length or Transfer-Encoding of its own for
    `content=`, and would re-normalise the path (folding dot segments); so the
    body is passed as `stream=` (httpx then adds no header at all) and the raw
    target rides in httpcore's `target` extension, sent as-is on the request line.
    """
    if upstream is None:
        upstream = config.upstreams[0]
    return httpx.Request(
        plan.method,
        _origin_url(upstream.origin),
        headers=byte_headers(attempt_headers(config, plan, upstream)),
        stream=request_stream(plan, content),
        extensions={"target": plan.target, "timeout": timeouts(config), UPSTREAM: upstream},
    )


def request_stream(plan: UpstreamPlan, content: Iterable[bytes] | AsyncIterable[bytes] | None,
                   ) -> _BodyStream | _NoBody:
    """The body sent upstream for a plan: `content`, or nothing when the plan has no body."""
    return _BodyStream(content) if content is not None and plan.has_body else _NO_BODY


class _BodyStream(httpx.AsyncByteStream, httpx.SyncByteStream):
    """The request body as an httpx stream (either kind), iterated once."""

    __slots__ = ("_content",)

    def __init__(self, content: Iterable[bytes] | AsyncIterable[bytes]) -> None:
        self._content = content

    def __iter__(self) -> Iterator[bytes]:
        if not isinstance(self._content, Iterable):
            raise RuntimeError("an async request body sent through a sync client")
        return iter(self._content)

    def __aiter__(self) -> AsyncIterator[bytes]:
        if not isinstance(self._content, AsyncIterable):
            raise RuntimeError("a sync request body sent through an async client")
        return aiter(self._content)


class _NoBody(httpx.AsyncByteStream, httpx.SyncByteStream):
    """No request body at all (stateless, shared)."""

    def __iter__(self) -> Iterator[bytes]:
        return iter(())

    def __aiter__(self) -> AsyncIterator[bytes]:
        return _nothing()


async def _nothing() -> AsyncIterator[bytes]:
    empty: tuple[bytes, ...] = ()
    for piece in empty:
        yield piece


_NO_BODY = _NoBody()


class _NoCookies(http.cookiejar.CookieJar):
    """A jar that keeps nothing: one user's Set-Cookie must never ride on another's request."""

    def set_cookie(self, cookie: http.cookiejar.Cookie) -> None:
        return None

    def extract_cookies(self, response: Any, request: Any) -> None:
        return None


def client_options(config: ProxyConfig) -> dict[str, Any]:
    """Keyword arguments for the httpx client a proxy creates for itself."""
    return {
        "follow_redirects": False,  # redirects are relayed, never followed
        "trust_env": False,         # no HTTP(S)_PROXY or netrc from the environment
        "cookies": _NoCookies(),
        "timeout": httpx.Timeout(config.timeout, read=config.timeout,
                                 write=config.idle_timeout, pool=config.pool_timeout),
        "limits": httpx.Limits(max_connections=config.max_connections,
                               max_keepalive_connections=config.max_keepalive_connections),
    }


def check_user_client(client: httpx.Client | httpx.AsyncClient, config: ProxyConfig) -> None:
    """Refuse a user-supplied `client=` that would make the proxy do what it must not, or
    ignore what the configuration asks (ValueError saying what to change).

    A user client lends its transport (pool, TLS settings, http2, a `proxy=` or
    `mounts=` of its own), its `auth` and its `event_hooks`; the proxy builds every
    request itself, so the client's headers, base_url, params, timeout and cookies
    play no part. Refused: `follow_redirects=True` (redirects are relayed, never
    followed), `trust_env=True` (httpx's default: HTTP(S)_PROXY, ALL_PROXY and
    SSL_CERT_FILE from the environment would decide where and how requests go), a
    `unix:` upstream (only the proxy's own transport reaches the socket; a plain
    client sends TCP to localhost:80), and `verify`/`cert` on the proxy (they
    configure its own client: set them on yours).
    """
    kind = type(client).__name__
    problems = []
    if client.follow_redirects:
        problems.append("follow_redirects=True (a proxy relays redirects, never follows them)")
    if client.trust_env:
        problems.append("trust_env=True, httpx's default (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY "
                        f"and SSL_CERT_FILE would steer it): pass {kind}(trust_env=False)")
    if any(upstream.scheme == "unix" for upstream in config.upstreams):
        problems.append("a unix: upstream (only the proxy's own client reaches a socket; "
                        "drop client=)")
    if config.verify is not True or config.cert is not None:
        problems.append(f"verify=/cert= on the proxy (they configure its own client: pass "
                        f"them to {kind}(...) instead)")
    if problems:
        raise ValueError(f"client=: this {kind} cannot be used by a proxy: "
                         + "; ".join(problems))


def disable_cookies(client: httpx.Client | httpx.AsyncClient) -> None:
    """Make a user-supplied client jar-less too (see `_NoCookies`)."""
    client.cookies = httpx.Cookies(_NoCookies())


def response_header_list(response: httpx.Response) -> list[Header]:
    """The upstream's raw headers with lower-cased names, duplicates and order kept."""
    if _FAST_HEADERS:  # httpx holds the lower-cased names already (byte_headers)
        return [(lower, value) for _, lower, value in response.headers._list]
    return [(name.lower(), value) for name, value in response.headers.raw]
