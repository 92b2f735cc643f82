"""One proxied exchange, written once: a generator flow both faces drive.

An exchange goes, on every face and for WebSocket handshakes too, in this order:

1. the plan (the core's, or the WebSocket handshake's), then the filters on the
   request (filters/chain.py); a filter may answer by itself, and then only the
   filters outside it see that answer on its way down;
2. an upstream chosen from the pool and the attempts: a failure before the
   response head goes to `face.retry`, which may name another upstream;
3. the response head (the core's), then the filters on the response;
4. the body relayed, then the end: the filters' `on_end`, the log line, the
   in-flight count (`face.finish`).

The flows below are generators (as httpx's `auth_flow` and our filter chain):
where a face must do I/O they call its *port* (a small per-request object of
the face: make an `attempt`, `relay` the body, answer a `problem`) and yield
what the call returned. `drive_sync` hands the value straight back (on the WSGI
face the port did the I/O in the call); `drive_async` awaits it (on the ASGI
face the port returned a coroutine) and throws its exception in where it was
yielded. So each rule (which error answers what, when to retry, what filters
see) is written once, and the faces keep only translation and I/O: reading the
body, writing messages, the disconnect watch and the drain's cut mechanics.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from .core import (
    CHECKED_CHUNKED,
    CHECKED_LENGTH,
    BodyCounter,
    CheckedRequest,
    IncomingRequest,
    ResponseHead,
    UpstreamPlan,
    discard_budget,
    early_discard,
)
from .errors import ClientDisconnected, NotProxied, ProxyError, map_upstream_errors
from .filters import Answer, Exchange
from .filters.base import Attempt
from .filters.chain import run_async

if TYPE_CHECKING:
    import httpx

    from .face import ProxyFace
    from .logs import RequestRecord
    from .upstreams import Upstream

T = TypeVar("T")
# A flow yields what a port call returned (a value on the sync face, an
# awaitable on the async one) and gets its result back.
Flow = Generator[Any, Any, T]


def drive_sync(flow: Flow[T]) -> T:
    """The sync driver: each action was done when the port was called; its value
    goes back in (a filter that awaits was refused at construction)."""
    try:
        value = next(flow)
        while True:
            value = flow.send(value)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


# The async driver: each action is awaited; its result goes back in, its exception
# (a cancellation too) is raised in the flow where it was yielded. The filter
# chain's stages are driven the same way (one driver for both).
drive_async = run_async


class Opened:
    """What the first step left: the plan to send, the filters' view (None
    without filters) and, when a filter answered, its answer and head."""

    __slots__ = ("_plan", "exchange", "answer", "head")

    def __init__(self, plan: UpstreamPlan | None, exchange: Exchange | None = None,
                 answer: Answer | None = None, head: ResponseHead | None = None) -> None:
        self._plan, self.exchange, self.answer, self.head = plan, exchange, answer, head

    @property
    def plan(self) -> UpstreamPlan:
        """The plan to send: the exchange's (built now if no filter asked for it)."""
        plan = self._plan if self.exchange is None else self.exchange.plan
        assert plan is not None
        return plan


def opening(face: ProxyFace[Any, Any, Any], incoming: IncomingRequest, record: RequestRecord,
            plan: UpstreamPlan | CheckedRequest) -> Flow[Opened]:
    """Step 1 after the plan (or the core's check, the plan built when first asked
    for: face.exchange): the filters on the request; a filter's own answer goes
    through the filters outside it (ProxyError: refuse)."""
    chain = face.chain
    if not chain.filters:  # no Exchange, no stage to run: a request without filters pays
        # nothing (its tuple's truth: the Chain's own __bool__ is a Python call)
        assert isinstance(plan, UpstreamPlan)  # (http_flow comes here with filters only)
        return Opened(plan)
    exchange = face.exchange(incoming, record, plan)
    answer = yield from chain.request(exchange)
    if answer is None:
        return Opened(None, exchange)
    head = face.answer_head(exchange, answer)
    if chain.wraps_answers and chain.outside(exchange):
        head = yield from chain.response(exchange, head)
    return Opened(None, exchange, answer, head)


def refusal(face: ProxyFace[Any, Any, Any], incoming: IncomingRequest, record: RequestRecord,
            port: Any, exc: ProxyError, keeps_step: bool = False) -> Flow[Any]:
    """A refusal before any upstream was asked: outside the mount goes to the
    fallback app when there is one (not the proxy's to log), else a problem. When
    the core refused (no filter saw the request), the filters watching refusals
    (`on_refusal`: tracing's SERVER span) see it first. `keeps_step`: an HTTP
    port, whose request body is dropped first (drop_unread)."""
    if isinstance(exc, NotProxied) and face.fallback is not None:
        face.pass_on(record)
        return (yield port.fallback())
    chain = face.chain
    if chain.watches_refusals and record.exchange is None:  # not a filter's own refusal
        yield from chain.refusal(Exchange(incoming, record), exc)
    if keeps_step:
        yield from drop_unread(port, incoming, None, exc.close_connection)
    return (yield port.problem(exc))


def drop_unread(port: Any, incoming: IncomingRequest, counter: BodyCounter | None,
                closing: bool, framing: tuple[int | None, bool] | None = None,
                ) -> Flow[None]:
    """Before an answer that comes ahead of the upload's end: the rest of a modest
    body read and dropped by the core's rule (core.early_discard before the
    upload, core.discard_budget after it began, with its `counter`) through
    `port.discard`. A body past the rule's limit is the server's to drop or close
    on: uvicorn reads it all, gunicorn and granian close (as nginx, which reads it
    all, does not; announcing the close instead made uvicorn reset a client still
    sending, which then lost the answer). `framing`: the checked request's (length,
    chunked), when there is one."""
    if counter is None:
        budget = early_discard(incoming, closing, framing)
    else:
        budget = discard_budget(counter, closing)
    if budget:
        yield port.discard(budget)


def attempts(face: ProxyFace[Any, Any, Any], record: RequestRecord, plan: UpstreamPlan,
             attempt: Callable[[Upstream], Any], exchange: Exchange | None = None,
             ) -> Flow[Any]:
    """Step 2: `attempt` on an upstream of the pool, then on others while
    `face.retry` allows (only failures before any response head come here).
    Each try goes through the filters' `on_attempt` and `on_attempt_end` when
    one implements them (filters/base.py); `plan` is the exchange's, so a filter's
    header change reaches the try."""
    chain = face.chain
    # The exchange whose filters watch each try; None (no such filter): no calls.
    watched = exchange if exchange is not None and chain.watches_attempts else None
    tried: list[Upstream] = []
    current = Attempt(face.choose(record))
    while True:
        if watched is not None:
            yield from chain.attempt(watched, current)
        try:
            result = yield attempt(current.upstream)
        except Exception as exc:
            if watched is not None:
                current.error = exc
                yield from chain.attempt_end(watched, current)
            after = face.retry(record, plan, tried, exc)
            if after is None:
                raise
            current = Attempt(after, current.number + 1)
        else:
            if watched is not None:
                yield from chain.attempt_end(watched, current)
            return result


def response(face: ProxyFace[Any, Any, Any], exchange: Exchange | None,
             head: ResponseHead) -> Flow[ResponseHead]:
    """Step 3: the filters on a response head (none: the head as it is)."""
    if exchange is None:
        return head
    return (yield from face.chain.response(exchange, head))


# -- HTTP ------------------------------------------------------------------------------------

class HttpPort(Protocol):
    """What a face does for one HTTP exchange. Each method does its I/O (sync face)
    or returns an awaitable doing it (async face); `upload` and `upload_over` are
    plain calls on both."""

    counter: BodyCounter | None  # the upload's, once it began with a body

    def fallback(self) -> Any: ...
    def problem(self, exc: ProxyError) -> Any: ...
    def answer(self, exchange: Exchange, head: ResponseHead, body: Any) -> Any: ...
    def upload(self, plan: UpstreamPlan, exchange: Exchange | None) -> None: ...
    def attempt(self, upstream: Upstream) -> Any: ...
    def upload_over(self) -> None: ...
    def discard(self, budget: int) -> Any: ...  # True: the body's end was reached
    def refused(self, exc: ProxyError) -> Any: ...
    def gone(self) -> Any: ...  # the client left during the upload
    def abandon(self, response: httpx.Response, exc: ProxyError | None) -> Any: ...
    def relay(self, head: ResponseHead, response: httpx.Response,
              exchange: Exchange | None) -> Any: ...


def http_flow(face: ProxyFace[Any, Any, Any], incoming: IncomingRequest,
              record: RequestRecord, port: HttpPort) -> Flow[Any]:
    """One HTTP exchange; returns what the port's last action returned (the
    WSGI face's response iterable). The end (`face.finish`) is the face's: on
    the sync face it comes when the server closes that iterable."""
    opened: Opened | None = None
    try:
        if face.chain.filters:  # without filters: no Exchange, no stage, no extra generator
            # The core's refusals first; the plan is built when asked for (not for
            # a filter's own answer that never reads it: a cache hit).
            checked = face.check(incoming)
            opened = yield from opening(face, incoming, record, checked)
        else:
            plan = face.plan(incoming)
    except ProxyError as exc:
        return (yield from refusal(face, incoming, record, port, exc, keeps_step=True))
    exchange: Exchange | None = None
    if opened is not None:
        exchange = opened.exchange
        if opened.answer is not None:
            assert exchange is not None and opened.head is not None
            length, chunked = checked[CHECKED_LENGTH], checked[CHECKED_CHUNKED]
            if chunked or length is not None:  # a body
                yield from drop_unread(port, incoming, None, opened.head.closes,
                                       (length, chunked))
            return (yield port.answer(exchange, opened.head, opened.answer.body))
        plan = opened.plan

    port.upload(plan, exchange)
    try:
        with map_upstream_errors():
            request, upstream_response = yield from attempts(face, record, plan, port.attempt,
                                                             exchange)
    except ProxyError as exc:
        if exchange is not None and not record.shutdown:
            # The filters' on_error (a cache's stale answer): an Answer instead of exc.
            try:
                answer = yield from face.chain.error(exchange, exc)
                if answer is not None:
                    head = yield from face.chain.response(
                        exchange, face.answer_head(exchange, answer))
                    port.upload_over()
                    return (yield port.answer(exchange, head, answer.body))
            except ProxyError as filter_refusal:
                exc = filter_refusal
        closing = exc.close_connection or record.shutdown  # record.shutdown: a drain's cut
        yield from drop_unread(port, incoming, port.counter, closing)
        return (yield port.refused(exc))
    except ClientDisconnected:
        return (yield port.gone())
    finally:
        port.upload_over()
    try:
        head = face.response_head(record, plan, request, upstream_response)
        if exchange is not None:
            head = yield from face.chain.response(exchange, head)
    except ProxyError as exc:
        return (yield port.abandon(upstream_response, exc))
    except BaseException:
        yield port.abandon(upstream_response, None)
        raise
    return (yield port.relay(head, upstream_response, exchange))


# -- WebSocket handshakes --------------------------------------------------------------------

class HandshakePort(Protocol):
    """What a face does for one WebSocket handshake (the tunnel or the relay after
    it is the face's own). As HttpPort: I/O done or an awaitable returned by
    `fallback`, `problem`, `answer`, `ready`, `attempt` and `opened`; `plan`,
    `head` and `drop` are plain calls on both faces."""

    def plan(self, incoming: IncomingRequest) -> UpstreamPlan: ...
    def fallback(self) -> Any: ...
    def problem(self, exc: ProxyError) -> Any: ...
    def answer(self, exchange: Exchange, head: ResponseHead, body: Any) -> Any: ...
    def ready(self, plan: UpstreamPlan) -> Any: ...
    def attempt(self, upstream: Upstream) -> Any: ...
    def head(self, result: Any) -> ResponseHead: ...
    def drop(self, result: Any) -> None: ...
    def opened(self, result: Any, head: ResponseHead) -> Any: ...


def handshake_flow(face: ProxyFace[Any, Any, Any], incoming: IncomingRequest,
                   record: RequestRecord, port: HandshakePort) -> Flow[Any]:
    """One WebSocket handshake, through the same steps as HTTP: the plan
    (`port.plan`), the filters on the request, the attempts (`port.attempt`
    returns the upstream's answer, a refusal included), the answer's head
    (`port.head`) through the filters on the response, then `port.opened` (the
    session, or the refusal relayed). `port.ready` may stop it before any
    upstream is asked (False: the client left). `on_end` runs when the session
    (or the refusal) ends, with the face's `finish`."""
    try:
        opened = yield from opening(face, incoming, record, port.plan(incoming))
    except ProxyError as exc:
        return (yield from refusal(face, incoming, record, port, exc))
    if opened.answer is not None:
        assert opened.exchange is not None and opened.head is not None
        return (yield port.answer(opened.exchange, opened.head, opened.answer.body))
    try:
        if not (yield port.ready(opened.plan)):
            return None
        with map_upstream_errors():
            result = yield from attempts(face, record, opened.plan, port.attempt,
                                         opened.exchange)
    except ProxyError as exc:
        return (yield port.problem(exc))
    try:
        head = yield from response(face, opened.exchange, port.head(result))
    except ProxyError as exc:
        port.drop(result)
        return (yield port.problem(exc))
    except BaseException:
        port.drop(result)
        raise
    return (yield port.opened(result, head))


def answer_body_chunks(body: Any) -> Any:
    """A filter's answer body as an iterable of chunks (bytes: one chunk)."""
    return (body,) if isinstance(body, bytes) else body


__all__ = ["Flow", "HandshakePort", "HttpPort", "Opened", "answer_body_chunks", "attempts",
           "drive_async", "drive_sync", "handshake_flow", "http_flow", "opening", "response"]
