"""Every failure the proxy can answer, and the one map from httpx errors to them.

Each `ProxyError` knows the HTTP status it becomes (h11's `error_status_hint`
idea) and renders itself as a small RFC 9457 `application/problem+json` body.
Both faces call `map_upstream_errors()` around the upstream call, so a refused
upstream is a 502 and a slow one a 504 whatever face the request came in on.
"""

from __future__ import annotations

import json
from contextvars import ContextVar
from http import HTTPStatus
from types import TracebackType

import httpx

from .wire import WireError

PROBLEM_CONTENT_TYPE = b"application/problem+json"


class ProxyError(Exception):
    """A failure that becomes an HTTP answer with `status` and a problem body."""

    status = 500
    # What the error log says, when it must say more than the client is told.
    log_detail: str | None = None
    # Refusals of the client's request close its connection after the answer
    # (as nginx does for 400/413/414): bytes the front server and the core might
    # frame differently are never taken for a next request.
    close_connection = False

    def __init__(self, detail: str, *, status: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if status is not None:
            if isinstance(status, bool) or not isinstance(status, int) \
                    or not 400 <= status <= 599:
                raise ValueError(f"a ProxyError status is 400-599, got {status!r}")
            self.status = status

    @property
    def title(self) -> str:
        """The reason phrase: the registered one, else a generic one (nginx's 499 has none)."""
        try:
            return HTTPStatus(self.status).phrase
        except ValueError:
            return "Client Error" if self.status < 500 else "Server Error"

    def body(self) -> bytes:
        """The RFC 9457 problem document for this error."""
        doc = {"type": "about:blank", "title": self.title, "status": self.status,
               "detail": self.detail}
        return json.dumps(doc, separators=(",", ":")).encode()

    def headers(self) -> list[tuple[bytes, bytes]]:
        headers = [
            (b"content-type", PROBLEM_CONTENT_TYPE),
            (b"content-length", str(len(self.body())).encode()),
            (b"cache-control", b"no-store"),
        ]
        if self.close_connection:
            headers.append((b"connection", b"close"))
        return headers


class BadRequest(ProxyError):
    status = 400
    close_connection = True


class NotProxied(ProxyError):
    """The path is outside the mount: 404 standalone, fall-through inside an app."""

    status = 404


class ClientTimeout(ProxyError):
    """The client stopped sending its request body (core.client_stalled)."""

    status = 408
    close_connection = True


class MountRedirect(ProxyError):
    """The mount named without its trailing slash (`/api`): the proxy's own redirect
    to `/api/`, query kept, as nginx and Starlette's Mount answer; relative links
    in the upstream's answer then resolve under the mount.

    GET and HEAD get 301 (the permanent redirect every client and cache knows);
    other methods 308, which forbids turning a POST into a GET (RFC 9110 15.4).
    """

    def __init__(self, location: bytes, method: str) -> None:
        super().__init__(f"the mount is {location.decode('latin-1')}")
        self.status = 301 if method in ("GET", "HEAD") else 308
        self.location = location

    def body(self) -> bytes:
        return b""

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"location", self.location), (b"content-length", b"0")]


class BodyTooLarge(ProxyError):
    status = 413
    close_connection = True


class TargetTooLong(ProxyError):
    status = 414
    close_connection = True


class HeadersTooLarge(ProxyError):
    status = 431
    close_connection = True


class BadGateway(ProxyError):
    status = 502


class InvalidHead(BadGateway):
    """A head the proxy itself made (a hook's, or the core's) breaks the wire rule
    (wire.py): never written. The client is told whose fault it is, the log also
    which hook and which field."""

    def __init__(self, problem: WireError, hook: str | None = None) -> None:
        whose = "the proxy's own hook" if hook is not None else "the proxy"
        super().__init__(f"{whose} produced an invalid {problem.what}")
        if hook is not None:  # (without a hook, the log names the WireError as the cause)
            self.log_detail = f"{self.detail}: {problem} (hook {hook})"


class ServiceUnavailable(ProxyError):
    status = 503


class ShuttingDown(ServiceUnavailable):
    """The graceful timeout came before the upstream's answer (the access line says
    `shutdown-cut`)."""

    def __init__(self) -> None:
        super().__init__("the proxy is shutting down")


class GatewayTimeout(ProxyError):
    status = 504


class ClientDisconnected(Exception):
    """The client went away; there is nobody left to answer."""


class IncompleteBody(BadRequest):
    """The client's body ended before its declared length (or was malformed)."""


class UpstreamTLSError(httpx.ConnectError):
    """The upstream's TLS certificate did not verify (raised by the drivers at connect).

    `reason` is what the client's 502 says; the message (with the upstream's
    address) is for the log only, as for every other upstream failure.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class UpstreamBroken(Exception):
    """The upstream failed after the response head was sent: abort the client connection."""


class TransformFailed(UpstreamBroken):
    """A response-body transform (a filter's, or decoding the upstream's encoded body)
    could not go on after the head was sent: the client connection is aborted, never
    ended as if the body were complete."""


# True in the request's context once an ASGI app left its response unfinished on
# purpose (a broken upstream: the access log's WARNING says so). The server's own
# "returned without completing response" line is then that abort again (dropped
# by servers/uvicorn.py, which logs in the same task right after the app returns).
RESPONSE_ABORTED: ContextVar[bool] = ContextVar("dualproxy_response_aborted", default=False)


class _UpstreamErrors:
    """`map_upstream_errors`: a class, not a @contextmanager (no generator made,
    started and stopped with a StopIteration each request); stateless, so shared."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        # Order matters: PoolTimeout and ConnectTimeout are TimeoutExceptions too, and
        # a connect *error* (refused, unreachable, DNS) must stay a 502, never a 504.
        if exc is None or not isinstance(exc, (httpx.TransportError, OSError,
                                               UpstreamTLSError)):
            return
        if isinstance(exc, httpx.PoolTimeout):
            raise ServiceUnavailable("no upstream connection became free in time") from exc
        if isinstance(exc, httpx.ConnectTimeout):
            raise GatewayTimeout("connecting to the upstream timed out") from exc
        if isinstance(exc, httpx.WriteTimeout):
            raise GatewayTimeout("the upstream stopped reading the request body") from exc
        if isinstance(exc, httpx.TimeoutException):
            raise GatewayTimeout("the upstream did not answer in time") from exc
        if isinstance(exc, UpstreamTLSError):
            raise BadGateway(f"TLS verification of the upstream failed: {exc.reason}") from exc
        if isinstance(exc, httpx.ConnectError):
            raise BadGateway("the upstream refused or could not be reached") from exc
        if isinstance(exc, httpx.LocalProtocolError):
            if isinstance(exc.__cause__, WireError):  # the codec's last check (wire.py)
                raise InvalidHead(exc.__cause__) from exc
            raise BadRequest("the request cannot be forwarded as sent") from exc
        raise BadGateway(f"the upstream failed: {describe(exc)}") from exc


class _StreamErrors:
    """`map_stream_errors` (a shared stateless class, as `_UpstreamErrors`)."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if isinstance(exc, httpx.TimeoutException):
            raise UpstreamBroken("the upstream went idle mid-body") from exc
        if isinstance(exc, (httpx.TransportError, OSError)):
            raise UpstreamBroken(f"the upstream failed mid-body: {describe(exc)}") from exc


_UPSTREAM_ERRORS = _UpstreamErrors()
_STREAM_ERRORS = _StreamErrors()


def map_upstream_errors() -> _UpstreamErrors:
    """Turn httpx failures before the response head into the matching ProxyError
    (a context manager)."""
    return _UPSTREAM_ERRORS


def map_stream_errors() -> _StreamErrors:
    """Turn httpx failures while relaying the response body into UpstreamBroken
    (a context manager)."""
    return _STREAM_ERRORS


# Why the upstream side of a request failed, for the metrics' `cause` label (a
# client that left is no upstream failure: `dualproxy_client_aborts_total`).
UPSTREAM_CAUSES = ("refused", "timeout", "cut_body", "other")


def upstream_cause(exc: BaseException) -> str | None:
    """The cause of an upstream failure (`UPSTREAM_CAUSES`), None when `exc` is none.

    A refusal of the client's request (400, 413, a hook's 403) is not the
    upstream's; 502, 503 and 504 are, and an UpstreamBroken (mid-body) too.
    """
    cause = exc.__cause__
    if isinstance(exc, UpstreamBroken):
        return "timeout" if isinstance(cause, httpx.TimeoutException) else "cut_body"
    if not isinstance(exc, ProxyError) or exc.status not in (502, 503, 504):
        return None
    if exc.status == 504 or isinstance(cause, httpx.TimeoutException):
        return "timeout"  # PoolTimeout (503) too: no connection came free in time
    if isinstance(cause, (httpx.ConnectError, ConnectionRefusedError)):
        return "refused"
    return "other"


def describe(exc: BaseException) -> str:
    """A one-line cause for logs and problem details, never a traceback."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
