"""The ASGI face's WebSocket path: the upstream handshake with `websockets`, then the relay.

Translation and I/O only: what the handshake carries is `handshake`'s decision.
Nothing is accepted before the upstream answered: its refusal reaches the client
as that HTTP answer (the ASGI `websocket.http.response` extension), an upstream
that cannot be reached or is too slow as a 502/504 problem. After the 101, two
tasks relay messages, one per direction; every send is awaited, so a slow
reader on either side slows the other (uvicorn pauses reading per message and
`websockets` reads at most `MAX_QUEUE` frames ahead). Whichever side ends ends
the other: a close frame is relayed with its code and reason, a vanished peer
closes the other side at once.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, ClassVar

from websockets.asyncio.client import ClientConnection, connect
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.frames import EXTERNAL_CLOSE_CODES
from websockets.http11 import Request

from ..config import ProxyConfig
from ..core import IncomingRequest, ResponseHead, UpstreamPlan, plan_response
from ..drain import DRAIN, call_in_loop
from ..errors import BadGateway, GatewayTimeout, InvalidHead, ProxyError, describe
from ..exchange import drive_async, handshake_flow
from ..filters import Exchange
from ..filters.chain import achunks, atransformed
from ..headers import Header
from ..http1.tls import upstream_context, verification_failure
from ..types import Receive, Scope, Send
from ..upstreams import Upstream
from ..wire import head_problem
from .framing import MESSAGE_TOO_BIG
from .handshake import (
    WebSocketPlan,
    accept_head,
    check_accept,
    library_request_headers,
    plan_handshake,
)
from .handshake import upgrade_plan as make_upgrade_plan

if TYPE_CHECKING:
    from ..asgi import AsyncProxy
    from ..logs import RequestRecord

# Frames `websockets` reads ahead of the relay before it stops reading the upstream.
# With it, one socket holds at most about 12 x ws_max_size when both peers flood and
# neither reads (measured by bench/ws_memory.py: 190 MB at the default 16 MiB).
MAX_QUEUE = 4
# How long a closing handshake may take before the TCP connection is dropped.
CLOSE_TIMEOUT = 5.0
# The close code a client gets when its upstream vanished (RFC 6455 7.4.1 registry).
BAD_GATEWAY = 1014
# Both sides of a socket still open at the graceful timeout get it (drain.py).
GOING_AWAY = 1001
_HTTP_RESPONSE = "websocket.http.response"


async def proxy_websocket(proxy: AsyncProxy, incoming: IncomingRequest, scope: Scope,
                          receive: Receive, send: Send) -> None:
    """Serve one ASGI `websocket` scope (its handshake: `incoming`) through `proxy`
    (fallback outside the mount), by the exchange's handshake flow."""
    record = proxy.begin(incoming)
    port = HandshakePort(proxy, scope, receive, send, record)
    try:
        await drive_async(handshake_flow(proxy, incoming, record, port))
    finally:
        if not port.passed_on:
            await proxy._finish(record)


class HandshakePort:
    """One handshake's I/O on the ASGI face (exchange.HandshakePort), then the session."""

    def __init__(self, proxy: AsyncProxy, scope: Scope, receive: Receive, send: Send,
                 record: RequestRecord) -> None:
        self.proxy, self.config = proxy, proxy.config
        self.scope, self.receive, self.send, self.record = scope, receive, send, record
        self.ws: WebSocketPlan | None = None
        self.connected = False  # the client's websocket.connect was received
        self.passed_on = False

    def plan(self, incoming: IncomingRequest) -> UpstreamPlan:
        return plan_handshake(self.config, incoming, server_checked=True,
                              routes=self.proxy.routes)

    async def fallback(self) -> None:
        self.passed_on = True
        assert self.proxy.fallback is not None
        await self.proxy.fallback(self.scope, self.receive, self.send)

    async def problem(self, exc: ProxyError) -> None:
        await _refuse_problem(self.scope, None if self.connected else self.receive,
                              self.send, exc, self.proxy, self.record)

    async def answer(self, exchange: Exchange, head: ResponseHead, body: Any) -> None:
        """A filter's own answer to the handshake: an HTTP response."""
        if (await self.receive())["type"] != "websocket.connect":
            self.record.client_gone = True
            return
        data = b"".join([chunk async for chunk in atransformed(
            exchange._response_pipeline, achunks(body))]) if head.has_body else b""
        self.record.status = head.status
        self.record.bytes_out = len(data)
        await _refuse(self.scope, self.send, head.status, head.headers, data)
        self.record.responded = True

    async def ready(self, plan: UpstreamPlan) -> bool:
        self.ws = make_upgrade_plan(self.config, plan, tunnel=False)  # 400: bad subprotocols
        if (await self.receive())["type"] != "websocket.connect":
            self.record.client_gone = True
            return False
        self.connected = True
        return True

    async def attempt(self, chosen: Upstream) -> ClientConnection | InvalidStatus:
        """The upstream after its 101, or its refusal (only the handshake is
        retried on another upstream, never after its answer)."""
        assert self.ws is not None
        # The plan of the attempt that answered.
        self.ws = ws = make_upgrade_plan(self.config, self.ws.plan, tunnel=False,
                                         upstream=chosen)
        try:
            return await open_upstream(self.config, ws, chosen)
        except InvalidStatus as exc:
            return exc

    def head(self, result: ClientConnection | InvalidStatus) -> ResponseHead:
        assert self.ws is not None
        if isinstance(result, InvalidStatus):
            refusal = result.response
            self.record.upstream_status(refusal.status_code)
            return plan_response(self.config, self.ws.plan, refusal.status_code,
                                 _lower(refusal.headers.raw_items()))
        self.record.upstream_status(101)
        assert result.request is not None and result.response is not None
        answer = _lower(result.response.headers.raw_items())
        check_accept(_lower(result.request.headers.raw_items()), answer)  # as websockets
        return accept_head(self.config, self.ws, 101, answer)

    def drop(self, result: ClientConnection | InvalidStatus) -> None:
        if not isinstance(result, InvalidStatus):
            result.transport.abort()

    async def opened(self, result: ClientConnection | InvalidStatus,
                     head: ResponseHead) -> None:
        record = self.record
        if isinstance(result, InvalidStatus):
            record.bytes_out = len(result.response.body)
            await _refuse(self.scope, self.send, head.status, head.headers,
                          bytes(result.response.body))
            return
        try:
            await self.send({"type": "websocket.accept", "subprotocol": result.subprotocol,
                             "headers": head.headers})
            record.responded = True
            self.proxy.session_opened(record)
            await Session(result, self.receive, self.send, record,
                          max_size=self.config.ws_max_size).run(self.config.ws_idle_timeout)
        except BaseException:
            result.transport.abort()  # never leave the upstream socket open behind us
            raise


def _lower(items: Any) -> list[Header]:
    return [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in items]


class _PlannedConnection(ClientConnection):
    """A `websockets` client connection that sends the plan's handshake.

    The library writes its own key, version and offered extensions; the
    target (byte-exact: its URI parsing would drop `;params` and an empty `?`)
    and every other header come from the plan.
    """

    plan: ClassVar[WebSocketPlan]

    async def handshake(self, additional_headers: Any = None,
                        user_agent_header: str | None = None) -> None:
        generate = self.protocol.connect
        plan = self.plan

        def planned() -> Request:
            generated = _lower(generate().headers.raw_items())
            headers = library_request_headers(plan, generated)
            problem = head_problem(plan.target, headers)
            if problem is not None:  # the last step before `websockets` writes it
                raise InvalidHead(problem) from problem
            return Request(plan.target.decode("ascii"), Headers(
                (name.decode("latin-1"), value.decode("latin-1")) for name, value in headers))

        self.protocol.connect = planned  # type: ignore[method-assign]
        await super().handshake(None, None)


class _NoRedirects(connect):
    """`websockets.connect` without its redirect following: a proxy relays redirects."""

    def process_redirect(self, exc: Exception) -> Exception | str:
        return exc


def _where(config: ProxyConfig, upstream: Upstream) -> tuple[str, dict[str, Any]]:
    """The URI `websockets` connects to and how: TLS with the route's context and the
    URL's host as server name for https, the socket path for unix."""
    if upstream.socket_path is not None:
        return "ws://localhost/", {"unix": True, "path": upstream.socket_path}
    if upstream.tls:
        return (f"wss://{upstream.origin.partition('://')[2]}/",
                {"ssl": upstream_context(config, upstream), "server_hostname": upstream.host})
    return f"ws://{upstream.origin.partition('://')[2]}/", {}


async def open_upstream(config: ProxyConfig, ws: WebSocketPlan,
                        upstream: Upstream | None = None) -> ClientConnection:
    """The upstream connection after its 101. InvalidStatus for any other answer;
    BadGateway when it cannot be reached or speaks no WebSocket (or its certificate
    does not verify); GatewayTimeout past `config.timeout` (which bounds connecting
    and the handshake, nothing after). `upstream`: the one chosen from the pool
    (default: the first); the plan's target and headers are sent whatever the URI."""
    connection_class = type("PlannedConnection", (_PlannedConnection,), {"plan": ws})
    uri, how = _where(config, upstream or config.upstreams[0])
    try:
        return await _NoRedirects(
            uri,
            **how,
            subprotocols=ws.subprotocols or None,  # type: ignore[arg-type]
            additional_headers=None,
            user_agent_header=None,  # no header the client did not send
            # Extensions are per hop: the front server negotiates the client's. The
            # upstream hop stays uncompressed: upstreams sit on the machine or LAN,
            # and deflating there would cost the proxy a second (de)compression.
            compression=None,
            proxy=None,              # never an HTTP(S)_PROXY from the environment
            open_timeout=config.timeout,
            close_timeout=CLOSE_TIMEOUT,
            max_size=config.ws_max_size,
            max_queue=MAX_QUEUE,
            create_connection=connection_class,
        )
    except InvalidStatus:
        raise
    except TimeoutError as exc:
        raise GatewayTimeout("the upstream did not complete the WebSocket handshake in time"
                             ) from exc
    except (OSError, InvalidHandshake) as exc:
        reason = verification_failure(exc)
        if reason is not None:
            raise BadGateway(f"TLS verification of the upstream failed: {reason}") from exc
        raise BadGateway(f"the upstream WebSocket handshake failed: {describe(exc)}") from exc


async def _refuse(scope: Scope, send: Send, status: int, headers: list[Header],
                  body: bytes) -> None:
    """Answer the handshake with an HTTP response, or 403 where the server cannot."""
    if _HTTP_RESPONSE in (scope.get("extensions") or {}):
        await send({"type": "websocket.http.response.start", "status": status,
                    "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008})


async def _refuse_problem(scope: Scope, receive: Receive | None, send: Send, exc: ProxyError,
                          proxy: AsyncProxy, record: RequestRecord) -> None:
    if receive is not None and (await receive())["type"] != "websocket.connect":
        return
    proxy.refuse(record, exc)
    await _refuse(scope, send, exc.status, exc.headers(), exc.body())


def _too_big(data: str | bytes, max_size: int) -> bool:
    """Is a message larger than `max_size` bytes (a text one counted as UTF-8)?"""
    if isinstance(data, bytes) or len(data) > max_size:
        return len(data) > max_size
    return len(data) * 4 > max_size and len(data.encode()) > max_size


def _sendable(code: int | None, reason: str, fallback: int) -> tuple[int, str]:
    """A close code that may go on the wire: 1005 (none given) is 1000; 1006 and the
    other reserved ones (no close frame at all) become `fallback`."""
    if code == 1005 or code is None:
        return 1000, ""
    if code in EXTERNAL_CLOSE_CODES or 3000 <= code < 5000:
        return code, reason
    return fallback, ""


class Session:
    """One open WebSocket: relays both ways until either side ends."""

    def __init__(self, upstream: ClientConnection, receive: Receive, send: Send,
                 record: RequestRecord, max_size: int | None = None) -> None:
        self.upstream = upstream
        # The largest client message. uvicorn enforces it before the app sees one
        # (`ws_max_size`); a server that does not (granian) hands it over whole.
        self.max_size = max_size
        self._relays: set[asyncio.Future[None]] = set()
        self.receive = receive
        self.send = send
        self.record = record
        self.last_activity = time.monotonic()
        self._stop: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Done when run() has closed both sides (or the session ended otherwise).
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def cut(self) -> None:
        """The graceful timeout (drain.py, its timer thread): close both sides 1001."""
        call_in_loop(self._stop.get_loop(), self._stopped)

    def _stopped(self) -> None:
        if not self._stop.done():
            self._stop.set_result(None)

    async def run(self, idle_timeout: float | None) -> None:
        relays = self._relays = {asyncio.ensure_future(self.client_to_upstream()),
                                 asyncio.ensure_future(self.upstream_to_client())}
        tasks: set[asyncio.Future[None]] = {*relays, self._stop}
        DRAIN.enter(self)
        try:
            while True:
                wait = None if idle_timeout is None else (
                    self.last_activity + idle_timeout - time.monotonic())
                done, _ = await asyncio.wait(tasks, timeout=wait,
                                             return_when=asyncio.FIRST_COMPLETED)
                if self._stop in done:
                    self.record.shutdown = True
                    await self.close_both(GOING_AWAY, "server shutting down")
                    return
                # A relay cancelled by the other one's close_both: wait for that one.
                finished = [task for task in done if not task.cancelled()]
                tasks -= done
                for task in finished:
                    task.result()
                if finished:
                    return
                if done:
                    continue
                if idle_timeout is not None and (
                        time.monotonic() - self.last_activity >= idle_timeout):
                    await self.close_both(GOING_AWAY, "idle timeout")
                    return
        finally:
            DRAIN.leave(self)
            for task in relays:
                task.cancel()
            await asyncio.gather(*relays, return_exceptions=True)
            if not self.ended.done():
                self.ended.set_result(None)

    async def close_both(self, code: int, reason: str) -> None:
        """The proxy's own close: the relays stop first, so no close the client echoes
        back (or a server reports as its own, granian's 1000) replaces this code."""
        for task in self._relays:
            if task is not asyncio.current_task():
                task.cancel()
        try:
            await self.send({"type": "websocket.close", "code": code, "reason": reason})
        except (OSError, RuntimeError):
            pass
        await self.upstream.close(code, reason)

    async def client_to_upstream(self) -> None:
        upstream, record = self.upstream, self.record
        while True:
            message = await self.receive()
            kind = message["type"]
            if kind == "websocket.receive":
                text = message.get("text")
                data: str | bytes = text if text is not None else message.get("bytes") or b""
                if self.max_size is not None and _too_big(data, self.max_size):
                    return await self.close_both(MESSAGE_TOO_BIG, "message too big")
                record.bytes_in += len(data)
                self.last_activity = time.monotonic()
                try:
                    await upstream.send(data)
                except ConnectionClosed:
                    return await self._wait_forever()  # the other task relays the close
            elif kind == "websocket.disconnect":
                code, reason = _sendable(message.get("code"), message.get("reason") or "",
                                         1001)
                await upstream.close(code, reason)
                return

    async def upstream_to_client(self) -> None:
        record = self.record
        while True:
            try:
                data = await self.upstream.recv()
            except ConnectionClosed as exc:
                frame = exc.rcvd if exc.rcvd is not None else exc.sent
                code, reason = _sendable(frame.code if frame else 1006,
                                         frame.reason if frame else "", BAD_GATEWAY)
                if frame is None:
                    reason = "the upstream went away"
                await self._send_or_leave({"type": "websocket.close", "code": code,
                                           "reason": reason})
                return
            record.bytes_out += len(data)
            self.last_activity = time.monotonic()
            if isinstance(data, str):
                await self._send_or_leave({"type": "websocket.send", "text": data})
            else:
                await self._send_or_leave({"type": "websocket.send", "bytes": data})

    async def _send_or_leave(self, message: dict[str, Any]) -> None:
        try:
            await self.send(message)
        except (OSError, RuntimeError):
            # The client is gone (uvicorn raises ClientDisconnected, an OSError):
            # the other task gets its disconnect and closes the upstream.
            await self._wait_forever()

    @staticmethod
    async def _wait_forever() -> None:
        await asyncio.Event().wait()
