"""A route's filter chain: runs the filters (base.py) at each stage of an exchange
and owns the framing fix-up when a body changes.

The stages that may await are generators yielding awaitables, driven by
`run_sync` (the sync face: a filter that awaits was refused at construction)
or `run_async` (the async face), as httpx's `auth_flow`: each rule is written
once for both faces. A chain without filters costs a face one truth test.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Generator,
    Iterable,
    Iterator,
    Sequence,
)
from typing import Any, TypeVar

from ..core import ResponseHead, UpstreamPlan
from ..errors import InvalidHead, ProxyError, TransformFailed
from ..headers import Header
from ..wire import WireError, field_problem, head_problem
from .base import Answer, Attempt, BodyTransform, Exchange, Filter, async_stages, overrides
from .codings import decoder

error_logger = logging.getLogger("dualproxy")

T = TypeVar("T")
Flow = Generator[Awaitable[Any], Any, T]

_FRAMING = frozenset({b"content-length", b"transfer-encoding"})
_FRAMING_SIZES = frozenset(len(name) for name in _FRAMING)
# Statuses whose body is never transformed: a 206 is a part of a representation
# (its byte ranges name the upstream's bytes); 204/304 and HEAD answers have none.
_UNTOUCHED = frozenset({204, 206, 304})


def run_sync(flow: Flow[T]) -> T:
    """Drive a stage on the sync face (no awaitable may come: refused at construction)."""
    try:
        awaitable = next(flow)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    flow.close()
    if inspect.iscoroutine(awaitable):
        awaitable.close()
    raise TypeError("an async filter ran on the sync face")


async def run_async(flow: Flow[T], awaitable: Awaitable[Any] | None = None) -> T:
    """Drive a stage on the async face: each awaitable a filter returned is awaited
    (from `awaitable` when the flow yielded it already: run_either's rest)."""
    try:
        if awaitable is None:
            awaitable = next(flow)
        while True:
            try:
                result = await awaitable
            except BaseException as exc:
                awaitable = flow.throw(exc)
            else:
                awaitable = flow.send(result)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


def run_either(flow: Flow[T]) -> T | Awaitable[T]:
    """Drive a flow as far as it goes without awaiting: its value when nothing came
    to await (a filter whose I/O is in memory costs no coroutine), else a coroutine
    for the rest, which the async face awaits (a filter's plain `def` may return it:
    the chain awaits what it gets). On the sync face nothing comes to await."""
    try:
        awaitable = next(flow)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    return run_async(flow, awaitable)


class Chain:
    """The ordered filters of one route, with the stages each one implements."""

    __slots__ = ("filters", "_request", "_response", "_trailers", "_error", "_end", "_async",
                 "_attempt", "_attempt_end", "_refusal", "_response_checked", "_outermost",
                 "wraps_answers")

    def __init__(self, filters: Sequence[object] = ()) -> None:
        checked: list[Filter] = []
        for flt in filters:
            if not isinstance(flt, Filter):
                raise TypeError(f"a filter must be a dualproxy Filter, not {type(flt).__name__}")
            checked.append(flt)
        self._index(checked)

    def _index(self, filters: Sequence[Filter]) -> None:
        self.filters: tuple[Filter, ...] = tuple(filters)
        indexed = list(enumerate(self.filters))
        self._request = [(i, f) for i, f in indexed if overrides(f, "on_request")]
        # On the way down, the reverse order: the first filter is the outermost.
        self._response = [(i, f) for i, f in reversed(indexed) if overrides(f, "on_response")]
        # A response filter whose head is checked (not all built-ins of valid heads).
        self._response_checked = any(not f._valid_heads for _, f in self._response)
        # The index of the outermost response filter (None: none).
        self._outermost = min((i for i, _ in self._response), default=None)
        # Is a response filter outside some request filter? (No: an answer from
        # on_request goes out as it is, `outside` need not be asked: a cache alone.)
        self.wraps_answers = self._outermost is not None and any(
            self._outermost < i for i, _ in self._request)
        self._trailers = [(i, f) for i, f in reversed(indexed) if overrides(f, "on_trailers")]
        self._error = [(i, f) for i, f in reversed(indexed) if overrides(f, "on_error")]
        self._end = [f for f in reversed(self.filters) if overrides(f, "on_end")]
        self._attempt = [f for f in self.filters if overrides(f, "on_attempt")]
        self._attempt_end = [f for f in reversed(self.filters) if overrides(f, "on_attempt_end")]
        self._refusal = [f for f in self.filters if overrides(f, "on_refusal")]
        self._async = [f"{f.label()}.{stage}" for f in self.filters for stage in async_stages(f)]

    def close(self) -> None:
        """Each filter's `close` (the sync face's proxy closing)."""
        for flt in self.filters:
            flt.close()

    async def aclose(self) -> None:
        """Each filter's `aclose` (the async face's proxy, at lifespan end)."""
        for flt in self.filters:
            await flt.aclose()

    def __bool__(self) -> bool:
        return bool(self.filters)

    def __len__(self) -> int:
        return len(self.filters)

    def require_sync(self) -> None:
        """Take each filter's sync form (`Filter.for_sync_face`), then refuse the async
        filters left, naming them (the sync face calls it once, at construction)."""
        synced = [flt.for_sync_face() for flt in self.filters]
        if any(new is not old for new, old in zip(synced, self.filters, strict=True)):
            self._index(synced)
        if self._async:
            raise TypeError(
                f"SyncProxy cannot run async hooks or filters ({', '.join(self._async)}): "
                "the WSGI face has no event loop. Use plain `def` methods (they run on "
                "both faces) or AsyncProxy.")

    # -- the request head ---------------------------------------------------------------

    def request(self, exchange: Exchange) -> Flow[Answer | None]:
        """Run `on_request` in order; an `Answer` stops the chain there. The plan a
        filter leaves must be writable (InvalidHead, a 502 naming it, otherwise)."""
        for index, flt in self._request:
            result = flt.on_request(exchange)
            if result is not None:
                if isinstance(result, Answer):  # _answered's, inline: a call less a hit
                    exchange.state[_ANSWERED] = index
                    if not flt._valid_heads:  # a built-in's own answer is valid already
                        _check_answer(flt, result)
                    return result
                if inspect.isawaitable(result):
                    result = yield result
                if _answered(exchange, index, flt, result, "on_request"):
                    return result  # type: ignore[no-any-return]
            # Checked even when the same plan object stays: its header list is mutable;
            # not when no filter read it yet (unbuilt: the core's, Exchange.plan).
            if not flt._valid_heads and exchange._planner is None:
                _check_plan(flt, exchange.plan)
        return None

    # -- each try of the upstream ----------------------------------------------------------

    @property
    def watches_attempts(self) -> bool:
        """Does a filter implement `on_attempt` or `on_attempt_end`? (No: the
        exchange's attempts run as if there were no chain.)"""
        return bool(self._attempt or self._attempt_end)

    def attempt(self, exchange: Exchange, attempt: Attempt) -> Flow[None]:
        """Run `on_attempt` in order, before a try; the plan a filter leaves is
        checked as after `on_request`."""
        for flt in self._attempt:
            result = flt.on_attempt(exchange, attempt)
            if result is not None and inspect.isawaitable(result):
                yield result
            if not flt._valid_heads:
                _check_plan(flt, exchange.plan)

    def attempt_end(self, exchange: Exchange, attempt: Attempt) -> Flow[None]:
        """Run `on_attempt_end` from the innermost filter out, after a try."""
        for flt in self._attempt_end:
            result = flt.on_attempt_end(exchange, attempt)
            if result is not None and inspect.isawaitable(result):
                yield result

    # -- the response head ----------------------------------------------------------------

    def outside(self, exchange: Exchange) -> bool:
        """Does a response filter outside the one that answered (`on_request`,
        `on_error`) see its answer's head? (No: `response` would return it as it is.)"""
        answered = exchange.state.get(_ANSWERED)
        outermost = self._outermost
        return answered is None or (outermost is not None and outermost < answered)

    def response(self, exchange: Exchange, head: ResponseHead) -> Flow[ResponseHead]:
        """Run `on_response` from the innermost filter out (only those before the
        one that answered, when one did), then fix the framing up."""
        answered = exchange.state.get(_ANSWERED)
        upstream_framing = _framing(head) if self._response_checked else []
        exchange.head = head
        for index, flt in self._response:
            if answered is not None and index >= answered:
                continue
            current = exchange.head
            result = flt.on_response(exchange, current)
            if result is None:
                result = exchange.head
            else:
                if inspect.isawaitable(result):
                    result = yield result
                if result is None:
                    result = exchange.head
                elif not isinstance(result, ResponseHead):
                    raise TypeError(f"filter {flt.label()!r}: on_response returned "
                                    f"{type(result).__name__}, expected a ResponseHead or None")
            result = _fix_framing(exchange, result)
            if not flt._valid_heads:
                problem = field_problem(result.headers) or _framing_problem(
                    exchange, result, upstream_framing)
                if problem is not None:
                    raise InvalidHead(problem, flt.label())
            exchange.head = result
        final = exchange.head
        exchange.head = None
        return final

    # -- an upstream that failed ----------------------------------------------------------

    def error(self, exchange: Exchange, error: ProxyError) -> Flow[Answer | None]:
        """Run `on_error` from the innermost filter out, when the upstream failed
        before its head; the first `Answer` is given instead of `error` (through the
        filters before the one that answered: `response` with that answer's head)."""
        for index, flt in self._error:
            result = flt.on_error(exchange, error)
            if inspect.isawaitable(result):
                result = yield result
            if _answered(exchange, index, flt, result, "on_error"):
                return result
        return None

    # -- trailers and the end -------------------------------------------------------------

    def trailers(self, exchange: Exchange, trailers: list[Header]) -> list[Header]:
        """Run `on_trailers` from the innermost filter out (plain functions only)."""
        for _, flt in self._trailers:
            result = flt.on_trailers(exchange, trailers)
            if result is not None:
                trailers = result
        return trailers

    @property
    def ends(self) -> bool:
        """Does any filter run at the end (`on_end`)? Without one, `end` needs no driving."""
        return bool(self._end)

    def end(self, exchange: Exchange, first: int = 0) -> Flow[None]:
        """Run `on_end` on every filter (from the `first` on); a failing one is logged,
        never raised (the answer is given already) and the others still run."""
        for flt in self._end[first:] if first else self._end:
            try:
                result = flt.on_end(exchange)
                if result is not None and inspect.isawaitable(result):
                    yield result
            except Exception:
                _end_failed(flt, exchange)

    def end_either(self, exchange: Exchange) -> Flow[None] | None:
        """`end` without a generator while no filter's `on_end` awaits (a cost each
        request): None, or the flow of the rest (its first step: that awaitable)."""
        for index, flt in enumerate(self._end):
            try:
                result = flt.on_end(exchange)
                if result is not None and inspect.isawaitable(result):
                    return self._end_after(exchange, flt, result, index + 1)
            except Exception:
                _end_failed(flt, exchange)
        return None

    def _end_after(self, exchange: Exchange, flt: Filter, pending: Awaitable[Any],
                   rest: int) -> Flow[None]:
        """`end` from where `flt`'s on_end returned `pending` to await."""
        try:
            yield pending
        except Exception:
            _end_failed(flt, exchange)
        yield from self.end(exchange, rest)

    # -- a request the core refused before the filters -------------------------------------

    @property
    def watches_refusals(self) -> bool:
        """Does a filter implement `on_refusal`? (No: a refusal makes no Exchange.)"""
        return bool(self._refusal)

    def refusal(self, exchange: Exchange, error: ProxyError) -> Flow[None]:
        """Run `on_refusal` in order, before the core's refusal `error` is answered; a
        failing filter is logged, never raised (the refusal is answered all the same)."""
        for flt in self._refusal:
            try:
                result = flt.on_refusal(exchange, error)
                if inspect.isawaitable(result):
                    yield result
            except Exception:
                error_logger.exception("filter %r failed on the refusal of %s %s",
                                       flt.label(), exchange.incoming.method,
                                       exchange.record.target_text())


_ANSWERED = object()  # exchange.state key: the index of the filter that answered


def _end_failed(flt: Filter, exchange: Exchange) -> None:
    error_logger.exception("filter %r failed at the end of %s %s", flt.label(),
                           exchange.incoming.method, exchange.record.target_text())


def _answered(exchange: Exchange, index: int, flt: Filter, result: Any, stage: str) -> bool:
    """Did the filter at `index` answer (an `Answer`, checked) or pass (None)?"""
    if isinstance(result, Answer):
        exchange.state[_ANSWERED] = index
        if not flt._valid_heads:  # a built-in's own answer is valid by construction
            _check_answer(flt, result)
        return True
    if result is not None:
        raise TypeError(f"filter {flt.label()!r}: {stage} returned "
                        f"{type(result).__name__}, expected an Answer or None")
    return False


def _check_plan(flt: Filter, plan: UpstreamPlan | None) -> None:
    if not isinstance(plan, UpstreamPlan):
        raise TypeError(f"filter {flt.label()!r} left exchange.plan as "
                        f"{type(plan).__name__}, expected an UpstreamPlan")
    method = plan.method.encode("latin-1", "replace") if isinstance(plan.method, str) else b""
    problem = head_problem(plan.target, plan.headers, method)
    if problem is not None:
        raise InvalidHead(problem, flt.label())


def _check_answer(flt: Filter, answer: Answer) -> None:
    if not 200 <= answer.status <= 599:
        raise TypeError(f"filter {flt.label()!r} answered status {answer.status} "
                        "(an Answer's status is 200 to 599)")
    problem = field_problem(answer.headers)
    if problem is not None:
        raise InvalidHead(problem, flt.label())


def _framing(head: ResponseHead) -> list[Header]:
    return [(name.lower(), value) for name, value in head.headers  # (the length: cheap)
            if isinstance(name, bytes) and len(name) in _FRAMING_SIZES
            and name.lower() in _FRAMING]


def _fix_framing(exchange: Exchange, head: ResponseHead) -> ResponseHead:
    """After a filter: when a transform may change the body's length, no
    Content-Length (whatever the filter returned) and a weak ETag."""
    pipeline = exchange._response_pipeline
    if pipeline is None or not pipeline.changes_length:
        return head
    head.headers[:] = _without_length(head.headers)
    return head


def _without_length(headers: list[Header]) -> list[Header]:
    out = []
    for name, value in headers:
        lname = name.lower() if isinstance(name, bytes) else name
        if lname == b"content-length":
            continue
        if lname == b"etag" and isinstance(value, bytes) and value.startswith(b'"'):
            value = b"W/" + value  # RFC 9110 8.8.3: the bytes differ, the meaning does not
        out.append((name, value))
    return out


def _framing_problem(exchange: Exchange, head: ResponseHead,
                     upstream: list[Header]) -> WireError | None:
    # A filter may not frame the body itself: the servers would send a second or
    # other Content-Length as given, and a client would read the next response as
    # this one's body. A length-changing transform drops Content-Length (the chain).
    pipeline = exchange._response_pipeline
    expected = upstream
    if pipeline is not None and pipeline.replacement is not None:
        return None  # the filter that replaced the body framed it (replace_response_body)
    if pipeline is not None and pipeline.changes_length:
        expected = [(n, v) for n, v in upstream if n != b"content-length"]
    if _framing(head) == expected:
        return None
    return WireError("header", "a response filter changed Content-Length or Transfer-Encoding")


# -- body transforms ----------------------------------------------------------------------

class BodyPipeline:
    """The transforms over one body, in the order they were installed (the
    innermost filter's first); a transform's failure is `TransformFailed`."""

    __slots__ = ("transforms", "changes_length", "decoded", "replacement", "waits")

    def __init__(self) -> None:
        self.transforms: list[BodyTransform] = []
        self.changes_length = False
        self.decoded = False
        # Awaitables a transform handed over (`Exchange.await_in_body`, the async face
        # only): awaited before the bytes it returned go on.
        self.waits: list[Awaitable[Any]] = []
        # A filter's own body instead of the upstream's (replace_response_body).
        self.replacement: bytes | Iterable[bytes] | AsyncIterable[bytes] | None = None

    def feed(self, chunk: bytes) -> bytes:
        try:
            for transform in self.transforms:
                if not chunk:
                    return b""
                chunk = transform.feed(chunk)
        except TransformFailed:
            raise
        except Exception as exc:
            raise TransformFailed(f"a body transform failed: {exc!r}") from exc
        return chunk

    def finish(self) -> bytes:
        data = b""
        try:
            for transform in self.transforms:
                data = (transform.feed(data) if data else b"") + transform.finish()
        except TransformFailed:
            raise
        except Exception as exc:
            raise TransformFailed(f"a body transform failed: {exc!r}") from exc
        return data


def install_response_transform(exchange: Exchange, transform: BodyTransform, *,
                               decode: bool, same_length: bool) -> bool:
    head = exchange.head
    if head is None:
        raise RuntimeError("transform_response is for on_response (the head is not in yet)")
    if not head.has_body or head.status in _UNTOUCHED or exchange.incoming.method == "HEAD":
        return False
    pipeline = exchange._response_pipeline
    if decode and (pipeline is None or not pipeline.decoded):
        codings = [value.strip().lower() for name, values in head.headers
                   if name.lower() == b"content-encoding"
                   for value in values.split(b",") if value.strip()]
        codings = [c for c in codings if c != b"identity"]
        step: BodyTransform | None = None
        if len(codings) > 1:
            return False  # stacked codings: not ours to unwrap
        if codings:
            step = decoder(codings[0])
            if step is None:
                return False
        if pipeline is None:
            pipeline = exchange._response_pipeline = BodyPipeline()
        pipeline.decoded = True
        if step is not None:
            pipeline.transforms.append(step)
            pipeline.changes_length = True
            head.headers[:] = [(n, v) for n, v in head.headers
                               if n.lower() != b"content-encoding"]
    if pipeline is None:
        pipeline = exchange._response_pipeline = BodyPipeline()
    pipeline.transforms.append(transform)
    if not same_length:
        pipeline.changes_length = True
    _fix_framing(exchange, head)
    return True


def replace_response_body(exchange: Exchange,
                          body: bytes | Iterable[bytes] | AsyncIterable[bytes]) -> None:
    if exchange.head is None:
        raise RuntimeError("replace_response_body is for on_response (the head is not in yet)")
    pipeline = exchange._response_pipeline = BodyPipeline()
    pipeline.replacement = body


def _replacement(body: bytes | Iterable[bytes] | AsyncIterable[bytes]) -> Iterable[bytes]:
    if isinstance(body, bytes):
        return (body,) if body else ()
    if isinstance(body, AsyncIterable):
        raise TypeError("an async replacement body on the sync face")
    return body


async def _areplacement(body: bytes | Iterable[bytes] | AsyncIterable[bytes],
                        ) -> AsyncIterator[bytes]:
    if isinstance(body, AsyncIterable):
        async for chunk in body:
            yield chunk
    else:
        for chunk in _replacement(body):
            yield chunk


def install_request_transform(exchange: Exchange, transform: BodyTransform) -> bool:
    plan = exchange.plan
    if plan is None or not plan.has_body:
        return False
    pipeline = exchange._request_pipeline
    if pipeline is None:
        pipeline = exchange._request_pipeline = BodyPipeline()
        # The transformed body's length is unknown: chunked upstream (RFC 9112 6.1).
        headers = [(n, v) for n, v in plan.headers
                   if n not in (b"content-length", b"transfer-encoding")]
        headers.append((b"transfer-encoding", b"chunked"))
        exchange.plan = dataclasses.replace(plan, headers=headers, content_length=None)
    pipeline.transforms.append(transform)
    pipeline.changes_length = True
    return True


def response_pipeline(exchange: Exchange | None) -> BodyPipeline | None:
    """The response body's transforms for a face's relay loop (None: relay as is)."""
    return exchange._response_pipeline if exchange is not None else None


def transformed(pipeline: BodyPipeline | None, chunks: Iterable[bytes]) -> Iterator[bytes]:
    """A sync body through `pipeline`."""
    if pipeline is None:
        yield from chunks
        return
    if pipeline.replacement is not None:
        chunks = _replacement(pipeline.replacement)
    for chunk in chunks:
        out = pipeline.feed(chunk)
        if pipeline.waits:
            _refuse_waits(pipeline)
        if out:
            yield out
    tail = pipeline.finish()
    if pipeline.waits:
        _refuse_waits(pipeline)
    if tail:
        yield tail


def _refuse_waits(pipeline: BodyPipeline) -> None:
    for awaitable in pipeline.waits:
        if inspect.iscoroutine(awaitable):
            awaitable.close()
    pipeline.waits.clear()
    raise TransformFailed("a body transform awaits on the sync face")


async def _awaited(pipeline: BodyPipeline) -> None:
    waits, pipeline.waits = pipeline.waits, []
    for awaitable in waits:
        await awaitable


async def achunks(body: bytes | Iterable[bytes] | AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """A filter's answer body as async chunks: bytes, or a sync or async iterable."""
    if isinstance(body, bytes):
        if body:
            yield body
    elif isinstance(body, AsyncIterable):
        async for chunk in body:
            yield chunk
    else:
        for chunk in body:
            yield chunk


async def atransformed(pipeline: BodyPipeline | None,
                       chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """An async body through `pipeline`."""
    if pipeline is None:
        async for chunk in chunks:
            yield chunk
        return
    if pipeline.replacement is not None:
        chunks = _areplacement(pipeline.replacement)
    async for chunk in chunks:
        out = pipeline.feed(chunk)
        if pipeline.waits:
            await _awaited(pipeline)
        if out:
            yield out
    tail = pipeline.finish()
    if pipeline.waits:
        await _awaited(pipeline)
    if tail:
        yield tail
