"""The async face: an ASGI application that forwards with `httpx.AsyncClient`.

Translation and I/O only; every decision is the core's. Two tasks per request:
the exchange (upload, response head, download) and a watcher on `receive()`
for `http.disconnect`, because uvicorn's `send()` stays silent after the client
has gone. Whichever finishes first decides: a vanished client cancels the
exchange at once, which closes the upstream connection and frees its pool slot.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterable, AsyncIterator, Awaitable
from typing import Any, TypeVar

import httpx

from .core import (
    BodyCounter,
    IncomingRequest,
    ResponseHead,
    UpstreamPlan,
    client_stalled,
)
from .drain import DRAIN, absorb_cancel, call_in_loop
from .errors import (
    RESPONSE_ABORTED,
    ClientDisconnected,
    ProxyError,
    ShuttingDown,
    UpstreamBroken,
    map_stream_errors,
)
from .exchange import drive_async, http_flow
from .face import ProxyFace, make_async_client
from .filters import Exchange
from .filters.chain import achunks, atransformed
from .http1.aio import AsyncBody, AsyncUpstreamTransport
from .http1.pool import Call, Reply
from .logs import RequestRecord
from .servers import BODY_FOLLOWS, ON_GONE
from .target import app_mount
from .types import ASGIApp, Message, Receive, Scope, Send
from .upstreams import Upstream
from .waits import within

T = TypeVar("T")

# A `websocket` scope's scheme, as the HTTP request its handshake was.
_HTTP_SCHEME = {"ws": "http", "wss": "https"}


def incoming_from_scope(scope: Scope) -> IncomingRequest:
    """The neutral request for an ASGI HTTP scope, or a `websocket` scope's handshake
    (a GET), from the raw path (never `path`)."""
    get = scope.get
    raw_path: bytes = get("raw_path") or scope["path"].encode("utf-8")
    query: bytes = get("query_string", b"")
    root_path: str = get("root_path", "")
    client = get("client")
    scheme: str = get("scheme", "http")
    # Positional: the fields' order (a keyword call costs more, once a request).
    return IncomingRequest(
        get("method", "GET"),
        raw_path + b"?" + query if query else raw_path,
        scope["headers"],
        client[0] if client else None,
        _HTTP_SCHEME.get(scheme, scheme),
        # Starlette's Mount keeps the full path and sets root_path to the prefix;
        # uvicorn's --root-path puts the prefix in raw_path too (0.54; some older
        # releases did not): only a prefix the raw path carries is a mount.
        app_mount(raw_path, root_path.encode("utf-8")) if root_path else b"",
        get("http_version", "1.1"),
    )


async def send_problem(send: Send, exc: ProxyError, record: Any = None) -> None:
    body = exc.body()
    await send({"type": "http.response.start", "status": exc.status, "headers": exc.headers(),
                BODY_FOLLOWS: True})
    if record is not None:
        record.responded = True
    await send({"type": "http.response.body", "body": body})


class AsyncProxy(ProxyFace[httpx.AsyncClient, httpx.AsyncBaseTransport, ASGIApp]):
    """ASGI reverse proxy. `AsyncProxy("http://upstream:8080/base", mount="/api")`.

    Pass `config=` to share one ProxyConfig with a SyncProxy, and `client=` to
    use your own `httpx.AsyncClient(trust_env=False)` (its cookie jar is disabled;
    you close it; `core.check_user_client` says what it may and may not change).
    Outside the mount it answers 404, or calls `fallback` when one is given.
    """

    def _new_client(self) -> tuple[httpx.AsyncClient, httpx.AsyncBaseTransport]:
        return make_async_client(self.config)

    async def _send(self, request: httpx.Request) -> httpx.Response:
        return await _send_via(self.client, self._transport, request)

    def _start_health(self, client: httpx.AsyncClient,
                      transport: httpx.AsyncBaseTransport | None) -> Any:
        from .health import HealthTask

        try:
            asyncio.get_running_loop()
        except RuntimeError:  # the client was made outside a loop: no task to start
            return None
        return HealthTask(self.config, self.balancer,
                          functools.partial(_send_via, client, transport))

    async def aclose(self) -> None:
        """Close the client if this proxy created it, and what the filters hold."""
        client = self._detach_client()
        if client is not None:
            await client.aclose()
        await self.chain.aclose()

    async def _not_http(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "websocket":
            from .websocket.relay_async import proxy_websocket

            await proxy_websocket(self, incoming_from_scope(scope), scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif self.fallback is not None:
            await self.fallback(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            try:
                message = await receive()
            except asyncio.CancelledError:  # a forced stop skips lifespan.shutdown
                if absorb_cancel():
                    return
                raise
            if message["type"] == "lifespan.startup":
                _ = self.client
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._not_http(scope, receive, send)
            return
        # An HTTP exchange, here (no coroutine of its own to step through).
        incoming = incoming_from_scope(scope)
        record = self.begin(incoming)
        port = HttpPort(self, scope, receive, send, record)
        try:
            await drive_async(http_flow(self, incoming, record, port))
        except asyncio.CancelledError:
            # The watcher (client gone) or the drain's cut cancelled us while the
            # exchange waited; anything else is the server's own stop.
            if not record.client_gone and not record.shutdown:
                record.shutdown = True
                if not absorb_cancel():
                    raise
            else:
                task = asyncio.current_task()
                uncancel = getattr(task, "uncancel", None)  # Python 3.11+
                if uncancel is not None:
                    uncancel()
            if record.shutdown and not record.status:  # cut before the upstream answered
                await self._problem(send, ShuttingDown(), record)
        finally:
            port.close()
            if not port.passed_on:  # _finish's steps (no coroutine unless one awaits)
                ended = self._end(record)
                if ended is not None:
                    await ended
                self.finish(record)

    # An HTTP scope's steps, by the name FastAPI's mount calls them (fastapi.py).
    handle_http = __call__

    async def _finish(self, record: RequestRecord) -> None:
        """The filters' `on_end` (awaited here: they may be async), then `finish`."""
        ended = self._end(record)
        if ended is not None:
            await ended
        self.finish(record)

    def _end(self, record: RequestRecord) -> Awaitable[None] | None:
        """The filters' `on_end`, once: an awaitable for the rest when one awaits."""
        exchange = record.exchange
        if exchange is None:
            return None
        record.exchange = None
        rest = self.chain.end_either(exchange)  # (no generator while none awaits)
        return None if rest is None else drive_async(rest)

    async def _problem(self, send: Send, exc: ProxyError, record: RequestRecord) -> None:
        self.refuse(record, exc)
        await send_problem(send, exc, record)

    async def _relay(
        self, stream: AsyncIterable[bytes], head: ResponseHead, send: Send, record: Any,
        exchange: Exchange | None, response: httpx.Response | Reply | None = None,
    ) -> None:
        """The head, then the body (through the filters' transforms). An upstream or
        a transform failing mid-body returns without the final body message: the
        server drops the connection (no last chunk, no short body passed off as
        complete). The transport's own body tells its last piece: that goes out
        with the end, one message. `response` (the upstream's, whose body `stream`
        is) is closed at the end, however it came."""
        try:
            has_body = head.has_body
            if has_body and exchange is not None and exchange._response_pipeline is not None:
                stream = atransformed(exchange._response_pipeline, stream)
            own = stream if isinstance(stream, AsyncBody) else None
            # The transport's own body (or none) comes next without a wait, or the head is
            # sent first by an empty body message: the server may hold the head for it.
            held = own is not None or not has_body
            await send({"type": "http.response.start", "status": head.status,
                        "headers": head.headers, BODY_FOLLOWS: held})
            record.status = head.status
            ended = False
            try:
                if has_body:
                    # The transport's own body read piece by piece (no async generator
                    # to step through); any other stream as an async iterator.
                    pieces = None if own is None else own.piece
                    chunks = stream.__aiter__() if own is None else None
                    with map_stream_errors():
                        while True:
                            if pieces is not None:
                                chunk = pieces()
                                if chunk is None:  # not at hand: wait for the upstream
                                    if held:  # the head out first (BODY_FOLLOWS)
                                        held = False
                                        if not await _send_body(send, b"", True, record):
                                            return
                                    waiter = own.more()  # type: ignore[union-attr]
                                    if waiter is not None:
                                        await waiter
                                    continue
                                if not chunk:
                                    break
                            else:
                                try:
                                    chunk = await chunks.__anext__()  # type: ignore[union-attr]
                                except StopAsyncIteration:
                                    break
                            record.bytes_out += len(chunk)
                            more = own is None or not own.ended
                            try:  # _send_body's rule, inline: no coroutine a chunk
                                await send({"type": "http.response.body", "body": chunk,
                                            "more_body": more})
                            except (OSError, RuntimeError) as exc:
                                if not _client_left(exc, record):
                                    raise
                                return
                            held = False
                            if not more:  # the stream ends at its next step (left to
                                ended = record.responded = True  # end, not suspended)
                                if pieces is not None:
                                    break
                    if ended:
                        return
            except UpstreamBroken as exc:
                record.upstream_broke(exc)
                RESPONSE_ABORTED.set(True)
                return
            record.responded = True
            await _send_body(send, b"", False, record)
        finally:
            if response is not None:  # the upstream's response, given back
                if (isinstance(response, Reply)
                        and response.stream.__class__ is AsyncBody):
                    response.stream.abandon()  # (its aclose, without a coroutine)
                else:
                    await response.aclose()


class HttpPort:
    """One HTTP exchange's I/O on the ASGI face (exchange.HttpPort): the flow
    decides, this reads the body, watches for a disconnect and sends messages.
    It is what the server's ON_GONE list and the drain (`cut`) are given too."""

    __slots__ = ("proxy", "scope", "receive", "send", "record", "plan", "content",
                 "counter", "watch", "on_gone", "task", "draining", "passed_on")

    def __init__(self, proxy: AsyncProxy, scope: Scope, receive: Receive, send: Send,
                 record: RequestRecord) -> None:
        self.proxy, self.scope, self.receive, self.send = proxy, scope, receive, send
        self.record = record
        self.plan: UpstreamPlan | None = None
        self.content: AsyncIterable[bytes] | None = None
        self.counter: BodyCounter | None = None
        # The disconnect watch on receive(), when the server offers no ON_GONE: it
        # starts once nothing else reads receive() (no body, the body was read to its
        # end, or the upstream's head came first: an early answer stops the upload).
        self.watch: DisconnectWatch | None = None
        self.on_gone: list[Any] | None = None  # the server's ON_GONE list, when it told
        self.task: asyncio.Task[Any] | None = None  # the exchange's, once it uploads
        self.draining = False  # entered in the drain's registry
        self.passed_on = False

    async def fallback(self) -> None:
        self.passed_on = True
        assert self.proxy.fallback is not None
        await self.proxy.fallback(self.scope, self.receive, self.send)

    async def problem(self, exc: ProxyError) -> None:
        await self.proxy._problem(self.send, exc, self.record)

    refused = problem

    async def discard(self, budget: int) -> bool:
        """Read and drop up to `budget` bytes of the request body nothing read yet
        (exchange.drop_unread); True when its end was reached."""
        watch = self.watch
        if watch is not None and watch.started:
            return True  # read to its end, or the watch drops what is left
        while True:
            try:
                message = await receive_within(self.receive, self.proxy.config.client_timeout)
            except (ProxyError, OSError):  # stalled or broken: the server closes
                return False
            if message["type"] != "http.request":  # the client left
                return False
            if not message.get("more_body", False):
                if watch is not None:
                    watch.start()  # the watch takes receive() now
                return True
            budget -= len(message.get("body", b""))
            if budget < 0:
                return False

    async def answer(self, exchange: Exchange, head: ResponseHead, body: Any) -> None:
        if type(body) is bytes and exchange._response_pipeline is None:
            # A whole body (a cache hit's, a refusal's): one message with the head's
            # end, as send_problem does; no transform to run, nothing to relay.
            record = self.record
            await self.send({"type": "http.response.start", "status": head.status,
                             "headers": head.headers, BODY_FOLLOWS: True})
            record.status = head.status
            if not head.has_body:
                body = b""
            record.bytes_out += len(body)
            record.responded = True
            try:  # _send_body's rule, inline: no coroutine
                await self.send({"type": "http.response.body", "body": body,
                                 "more_body": False})
            except (OSError, RuntimeError) as exc:
                if not _client_left(exc, record):
                    raise
            return
        await self.proxy._relay(achunks(body), head, self.send, self.record, exchange)

    def upload(self, plan: UpstreamPlan, exchange: Exchange | None) -> None:
        proxy, record = self.proxy, self.record
        self.plan = plan
        # This task is cancelled if the client leaves before the response is
        # complete (`cancel_for_gone`), only while it is suspended inside the
        # exchange (record.responded guards the rest), so the cancellation is
        # always ours to absorb. Told by the server when it offers (ON_GONE, a
        # bodiless request: no body to drop after an early answer), else by a
        # watch on receive() (DisconnectWatch).
        self.task = task = asyncio.current_task()
        assert task is not None
        on_gone = None if plan.has_body else self.scope.get(ON_GONE)
        if isinstance(on_gone, list):
            on_gone.append(self.client_gone)
            self.on_gone = on_gone
        else:
            self.watch = watch = DisconnectWatch(self.receive, record, task)
            if not plan.has_body:
                watch.start_soon()
        if plan.has_body:
            self.counter = counter = BodyCounter(plan, proxy.config)
            assert self.watch is not None
            content = _request_body(self.receive, counter,
                                    self.watch, record, proxy.config.client_timeout)
            if exchange is not None and exchange._request_pipeline is not None:
                content = atransformed(exchange._request_pipeline, content)
            self.content = content
        if DRAIN.armed:
            self.draining = True
            DRAIN.enter(self)

    def client_gone(self) -> None:
        """The server's word (ON_GONE) that the client left."""
        assert self.task is not None
        cancel_for_gone(self.record, self.task)

    def cut(self) -> None:
        """The drain's cut at the graceful timeout: the timer thread asks the loop to
        cancel the exchange's task, which absorbs it as `shutdown-cut`."""
        assert self.task is not None
        call_in_loop(self.task.get_loop(), self._cancel)

    def _cancel(self) -> None:
        task = self.task
        if not self.record.responded and task is not None and not task.done():
            self.record.shutdown = True
            task.cancel()

    async def attempt(self, upstream: Upstream,
                      ) -> tuple[httpx.Request, httpx.Response] | tuple[Call, Reply]:
        proxy, plan = self.proxy, self.plan
        assert plan is not None
        transport = proxy._transport
        result: tuple[httpx.Request, httpx.Response] | tuple[Call, Reply]
        if isinstance(transport, AsyncUpstreamTransport):  # ours: no httpx objects
            call = proxy.upstream_call(plan, self.content, upstream)
            result = call, await transport.send(call)
        else:
            request = proxy.upstream_request(plan, self.content, upstream)
            result = request, await proxy._send(request)
        watch = self.watch
        if watch is not None and plan.has_body:
            # The head is in: the upload is over (whole, or stopped by an early
            # answer, its rest left unread), so the watch takes receive() now.
            watch.start()
        return result

    def upload_over(self) -> None:
        pass

    async def gone(self) -> None:
        self.record.client_gone = True

    async def abandon(self, response: httpx.Response | Reply, exc: ProxyError | None) -> None:
        try:
            if exc is not None:
                await self.problem(exc)
        finally:
            await response.aclose()

    def relay(self, head: ResponseHead, response: httpx.Response | Reply,
              exchange: Exchange | None) -> Awaitable[None]:
        """The relay's coroutine (`_relay` closes `response`; no coroutine of its own)."""
        # Our own transport's stream is raw already: no httpx wrappers.
        stream: AsyncIterable[bytes] = (
            response.stream if isinstance(response, Reply) else response.aiter_raw())
        return self.proxy._relay(stream, head, self.send, self.record, exchange, response)

    def close(self) -> None:
        if self.draining:
            DRAIN.leave(self)
        if self.watch is not None:
            self.watch.cancel()
        if self.on_gone is not None:
            self.on_gone.clear()  # over: a later disconnect is not this exchange's


async def _send_body(send: Send, chunk: bytes, more: bool, record: RequestRecord) -> bool:
    """Send one body message; False when the client's connection is already gone.

    uvicorn only notices a closed connection in `connection_lost`; until that runs,
    uvloop's transport raises RuntimeError on write ("the handler is closed"). That is
    the client leaving, not a failure of ours: no traceback, outcome client-gone.
    """
    try:
        await send({"type": "http.response.body", "body": chunk, "more_body": more})
    except (OSError, RuntimeError) as exc:
        if not _client_left(exc, record):
            raise
        return False
    return True


def _client_left(exc: OSError | RuntimeError, record: RequestRecord) -> bool:
    """Did a failed `send` say the client is gone (then recorded so)? Not when it is
    a RuntimeError other than uvloop's "is closed" (a bug of ours: raised again)."""
    if isinstance(exc, RuntimeError) and "is closed" not in str(exc):
        return False
    record.client_gone = True
    return True


async def _send_via(client: httpx.AsyncClient, transport: httpx.AsyncBaseTransport | None,
                    request: httpx.Request) -> httpx.Response:
    """Send through dualproxy's transport directly when the face made it, else the client."""
    if transport is not None:
        return await transport.handle_async_request(request)
    return await client.send(request, stream=True, follow_redirects=False)


async def receive_within(receive: Receive, seconds: float) -> Message:
    """The next ASGI message, or core.client_stalled after `seconds` without one
    (waits.within: a drain cut that comes with a piece is not lost)."""
    try:
        return await within(receive(), seconds)
    except asyncio.TimeoutError:
        raise client_stalled(seconds) from None


async def _request_body(
    receive: Receive, counter: BodyCounter, watch: DisconnectWatch, record: Any,
    client_timeout: float,
) -> AsyncIterator[bytes]:
    """Stream the client's body upstream as it arrives, counting it on the way; a
    wait of `client_timeout` for the next piece ends it (core.client_stalled)."""
    while True:
        message = await receive_within(receive, client_timeout)
        if message["type"] == "http.disconnect":
            raise ClientDisconnected("client went away during the upload")
        chunk = message.get("body", b"")
        if chunk:
            counter.feed(len(chunk))
            record.bytes_in += len(chunk)
            yield chunk
        if not message.get("more_body", False):
            break
    counter.finish()
    watch.start()


# How long a bodiless exchange runs before its disconnect watch starts (start_soon):
# a client that leaves is seen this much later at most, a quick response never
# pays for the watch.
WATCH_DELAY = 0.02


class DisconnectWatch:
    """Cancels the exchange's task when the client disconnects before the response is
    complete, by callbacks on receive(): no task of its own where receive() returns
    a future (granian's do); a coroutine (uvicorn's) runs in a task each call.

    It reads receive() once started: WATCH_DELAY in without a body, else once the body
    was read or the upstream answered before it (two readers would steal each
    other's messages); body the upload left unread is dropped. uvicorn also
    reports a disconnect once the response is complete; `record.responded` tells
    the two apart (`cancel_for_gone`). Each future's callback is removed once it is
    over (done, or the watch ended): granian's future keeps its callback for good,
    out of the garbage collector's sight (bridge._Watch: a leak a request).
    """

    __slots__ = ("receive", "record", "task", "waiting", "started", "timer")

    def __init__(self, receive: Receive, record: RequestRecord,
                 task: asyncio.Task[Any]) -> None:
        self.receive, self.record, self.task = receive, record, task
        self.waiting: asyncio.Future[Message] | None = None
        self.started = False
        self.timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Take receive() from now on (once; later calls do nothing)."""
        if not self.started:
            self.started = True
            self._next()

    def start_soon(self) -> None:
        """Take receive() in WATCH_DELAY unless the exchange is over by then: a
        bodiless request has no body to read, and its first receive() only hands
        over the empty body (granian's: a round trip to its thread each), so a
        response that comes quickly needs no watch at all."""
        if not self.started and self.timer is None:
            self.timer = self.task.get_loop().call_later(WATCH_DELAY, self.start)

    def _next(self) -> None:
        waiting: Any = self.receive()
        if not asyncio.isfuture(waiting):
            waiting = asyncio.ensure_future(waiting, loop=self.task.get_loop())
        waiting.add_done_callback(self._done)
        self.waiting = waiting

    def _done(self, waiting: asyncio.Future[Message]) -> None:
        waiting.remove_done_callback(self._done)
        if self.waiting is not waiting or waiting.cancelled() or waiting.exception():
            return  # the watch was ended, or the server's receive() failed
        if waiting.result()["type"] == "http.disconnect":
            cancel_for_gone(self.record, self.task)
        else:  # body the upload left unread: dropped, read on
            self._next()

    def cancel(self) -> None:
        timer = self.timer
        if timer is not None:
            timer.cancel()
        self.started = True  # over: a timer that fired already starts nothing
        waiting, self.waiting = self.waiting, None
        if waiting is not None:
            waiting.remove_done_callback(self._done)
            waiting.cancel()


def cancel_for_gone(record: RequestRecord, task: asyncio.Task[Any]) -> None:
    """The client is gone: an exchange whose response is not complete is cancelled."""
    if not record.responded:
        record.client_gone = True
        task.cancel()
