"""What a filter is: the objects a filter sees and the answers it may give.

A filter is one step of a route's chain (chain.py). Per exchange, in chain order
on the way up and in reverse order on the way down (the first filter is the
outermost, nearest the client, as Envoy's filters and ASGI middleware are):

- `on_request(exchange)`: the request head, before an upstream is chosen. It may
  replace `exchange.plan`, install a request-body transform, or return an
  `Answer` to answer by itself (a cache hit, a 429, a refusal): no upstream is
  asked, and only the filters before it see that answer on its way down.
- `on_response(exchange, head)`: the response head. It may return a replacement
  `ResponseHead` (or None: keep it) and install a response-body transform.
- `on_trailers(exchange, trailers)`: the upstream's trailer fields, where the
  exchange relays them (returns a replacement list or None).
- `on_error(exchange, error)`: the upstream failed before a response head
  (refused, reset, timed out: `error` is the ProxyError the client would get).
  It may return an `Answer` to give instead (a cache's stale answer); only the
  filters before it see that answer. The faces call it where they have the error.
- `on_attempt(exchange, attempt)`: before each try of the upstream (the first,
  then each retry on another upstream: `attempt.number` 0, 1, ...), after the
  upstream is chosen (`attempt.upstream`). It may change `exchange.plan.headers`
  in place for this try (a trace context header per try); the next try sees
  what it left. `on_attempt_end(exchange, attempt)`: that try is over, its
  response head in (`attempt.error` None) or failed (`attempt.error`: what the
  transport raised). A route without such a filter pays nothing for them.
- `on_end(exchange)`: once, when the exchange is over whatever its outcome; the
  record (`exchange.record`) holds the status, bytes each way, timings and outcome.
- `on_refusal(exchange, error)`: instead of all the above, for a request the core
  refused before any filter saw it (a bad target 400, outside the mount 404, a
  body declared too large 413, the mount's redirect: `error` is the ProxyError
  answered right after; `exchange.plan` is None). For observers (a SERVER span);
  its failure is logged, never raised. A route without such a filter pays nothing.

Each method is a plain `def` (runs on both faces) or an `async def` (the async
face only: `SyncProxy` refuses such a filter at construction). Raising a
`ProxyError` from `on_request`/`on_response` refuses the request with its status.

Bodies are changed by transforms (`BodyTransform`: `feed(chunk) -> bytes` and
`finish() -> bytes`, like zlib's compress objects), made per exchange. The chain
owns the framing fix-up when a transform may change the body's length.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from ..core import IncomingRequest, ResponseHead, UpstreamPlan
from ..errors import ProxyError
from ..headers import Header

if TYPE_CHECKING:
    from ..logs import RequestRecord
    from ..upstreams import Upstream
    from .chain import BodyPipeline


class BodyTransform(Protocol):
    """Body bytes in, body bytes out, as they stream. `feed` may hold bytes back
    (return b"") and `finish` returns what is left at the end of the body. A
    transform that raises fails the exchange: the client's response is aborted,
    never ended as if complete."""

    def feed(self, chunk: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


@dataclass
class Answer:
    """A response a filter gives by itself, without an upstream.

    `body`: bytes, or an iterable of bytes (an async iterable on the async face
    only). Content-Length is added for a bytes body unless the headers frame it.
    """

    status: int
    headers: list[Header] = field(default_factory=list)
    body: bytes | Iterable[bytes] | AsyncIterable[bytes] = b""
    # A built-in's answer whose headers frame its body already (a cache hit's stored
    # head, its Content-Length in it): the face does not look for the framing.
    framed: ClassVar[bool] = False


class Attempt:
    """One try of the upstream request, as `on_attempt` and `on_attempt_end` see it:
    `upstream` (the one chosen), `number` (0 the first try, 1 the first resend ...:
    OpenTelemetry's `http.request.resend_count`), `error` (what ended it before a
    response head; None while it runs and when the head came)."""

    __slots__ = ("upstream", "number", "error")

    def __init__(self, upstream: Upstream, number: int = 0) -> None:
        self.upstream = upstream
        self.number = number
        self.error: BaseException | None = None


class Filter:
    """Base class: every method passes everything through; override what you need.

    One instance serves every exchange of its route (concurrently, on both faces):
    keep per-exchange state on the exchange (`exchange.state`), not on `self`.
    """

    #: the name in error messages and logs (default: the class name)
    name: str = ""
    # A built-in whose changes to a plan or a response head, and whose own answers, are
    # writable by construction (tracing's traceparent, the cache's stored responses):
    # the chain skips checking what it left (a cost a request).
    _valid_heads: bool = False

    def on_request(self, exchange: Exchange) -> Answer | None | Any:
        return None

    def on_response(self, exchange: Exchange, head: ResponseHead) -> ResponseHead | None | Any:
        return None

    def on_trailers(self, exchange: Exchange, trailers: list[Header]) -> list[Header] | None:
        return None

    def on_error(self, exchange: Exchange, error: ProxyError) -> Answer | None | Any:
        return None

    def on_attempt(self, exchange: Exchange, attempt: Attempt) -> None | Any:
        return None

    def on_attempt_end(self, exchange: Exchange, attempt: Attempt) -> None | Any:
        return None

    def on_end(self, exchange: Exchange) -> None | Any:
        return None

    def on_refusal(self, exchange: Exchange, error: ProxyError) -> None | Any:
        return None

    def label(self) -> str:
        return self.name or type(self).__qualname__

    def for_sync_face(self) -> Filter:
        """The filter the sync face runs in this one's place (`Chain.require_sync`):
        itself; a built-in with an async form (the rate limit's Redis store) gives
        its sync twin."""
        return self

    def close(self) -> None:
        """Release what the filter holds (the sync face's proxy, at its close): nothing
        here; the cache closes its Redis client."""

    async def aclose(self) -> None:
        """Release what the filter holds from the event loop (the async face's proxy,
        at lifespan end): nothing here."""


# The stages a filter may override, in the order an exchange meets them.
STAGES = ("on_request", "on_attempt", "on_attempt_end", "on_response", "on_trailers",
          "on_error", "on_end", "on_refusal")


def overrides(flt: Filter, stage: str) -> bool:
    """Does `flt` do anything at `stage` (a method other than the base class's)?"""
    method = getattr(type(flt), stage, None)
    return method is not None and method is not getattr(Filter, stage)


def async_stages(flt: Filter) -> list[str]:
    """The stages `flt` implements with `async def` (refused on the sync face)."""
    return [stage for stage in STAGES
            if overrides(flt, stage) and inspect.iscoroutinefunction(getattr(flt, stage))]


class Exchange:
    """One proxied exchange as the filters see it.

    `incoming`: what the front server received; `plan`: the upstream request
    (a filter may replace it in `on_request`); `record`: what happened so far
    (status, bytes, timings, outcome: logs.RequestRecord); `route`: the mount
    (`b""`: none); `state`: a dict for the filters' own per-exchange values;
    `client` is the client's address after trusted proxies; `request_id` is set
    by the request_id filter (filters/request_id.py, the outermost) when the
    route has request ids on, None otherwise.
    """

    __slots__ = ("incoming", "_plan", "_planner", "record", "route", "state", "request_id",
                 "head", "_response_pipeline", "_request_pipeline", "_decoded")

    def __init__(self, incoming: IncomingRequest, record: RequestRecord,
                 route: bytes = b"", planner: Callable[[], UpstreamPlan] | None = None,
                 ) -> None:
        self.incoming = incoming
        self.record = record
        self.route = route
        self._plan: UpstreamPlan | None = None
        # The core's plan, built when `plan` is first read (face.exchange): a filter
        # that answers without reading it (a cache hit) spares the request its building.
        self._planner = planner
        self.state: dict[Any, Any] = {}
        self.request_id: str | None = None
        # The response head as the chain holds it while `on_response` filters run.
        self.head: ResponseHead | None = None
        self._response_pipeline: BodyPipeline | None = None
        self._request_pipeline: BodyPipeline | None = None
        self._decoded = False

    @property
    def plan(self) -> UpstreamPlan | None:
        """The upstream request (None: the core refused the request, `on_refusal`)."""
        planner = self._planner
        if planner is not None:
            self._planner = None
            self._plan = planner()
        return self._plan

    @plan.setter
    def plan(self, plan: UpstreamPlan | None) -> None:
        self._planner = None
        self._plan = plan

    @property
    def client(self) -> str | None:
        """The client's address, after trusted proxies (as the access log has it)."""
        return self.record.client

    @property
    def method(self) -> str:
        return self.incoming.method

    def transform_response(self, transform: BodyTransform, *, decode: bool = False,
                           same_length: bool = False) -> bool:
        """Run `transform` over the response body (call it from `on_response`).

        `decode`: the body is decoded first (gzip, deflate, br, zstd) and goes on
        decoded, its Content-Encoding dropped (a compressing filter nearer the
        client may encode it again). `same_length`: the transform never changes
        the body's bytes' count (an observer): the framing is left as it is.

        False, and nothing installed, when the body must not be transformed: no
        body (HEAD, 204, 304), a 206 part, or `decode` asked for an encoding this
        Python cannot decode. Otherwise the chain drops Content-Length (the
        server then chunks to HTTP/1.1 clients and closes after the body for
        HTTP/1.0) and weakens a strong ETag (RFC 9110 8.8.1: the bytes differ).
        """
        from .chain import install_response_transform

        return install_response_transform(self, transform, decode=decode,
                                          same_length=same_length)

    def replace_response_body(self, body: bytes | Iterable[bytes] | AsyncIterable[bytes],
                              ) -> None:
        """Answer with `body` instead of the upstream's (call it from `on_response`,
        returning a head that frames `body`: its Content-Length, or none). The
        upstream's body is never read; transforms installed before are dropped,
        those installed after (filters nearer the client) run over `body`. How a
        cache turns a 304 into the stored answer. An async iterable is for the
        async face only."""
        from .chain import replace_response_body

        replace_response_body(self, body)

    def await_in_body(self, awaitable: Awaitable[Any]) -> None:
        """(The async face.) Have the response body's relay await `awaitable` before
        the bytes the current transform call returns go on: a transform's own I/O (the
        cache writing a body it observed to an asyncio store, before the client has
        its last byte). Call it from a response transform's `feed` or `finish`."""
        pipeline = self._response_pipeline
        if pipeline is None:
            raise RuntimeError("await_in_body is for a response transform")
        pipeline.waits.append(awaitable)

    def transform_request(self, transform: BodyTransform) -> bool:
        """Run `transform` over the request body (call it from `on_request`): the
        upstream request is then chunked (its Content-Length dropped). False when
        the request has no body."""
        from .chain import install_request_transform

        return install_request_transform(self, transform)
