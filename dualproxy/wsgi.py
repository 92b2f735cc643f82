"""The sync face: a WSGI application that forwards with `httpx.Client`.

Translation and I/O only; every decision is the core's. No event loop and no
thread of its own: the request body is read from `wsgi.input` in chunks as
httpx sends it, and the response is an iterable whose `close()` (which servers
call when the client goes away) closes the upstream response at once.
"""

from __future__ import annotations

import functools
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar
from urllib.parse import quote

import httpx

from .core import BodyCounter, IncomingRequest, UpstreamPlan, client_stalled, discard_budget
from .drain import DRAIN
from .errors import (
    ClientDisconnected,
    IncompleteBody,
    NotProxied,
    ProxyError,
    ShuttingDown,
    UpstreamBroken,
    describe,
    map_stream_errors,
    map_upstream_errors,
)
from .face import ProxyFace, make_sync_client
from .filters import Answer, Exchange
from .filters.chain import BodyPipeline, run_sync, transformed
from .hooks import run_request_hooks
from .http1 import CLIENT_WATCH, ClientWatch
from .logs import RequestRecord
from .servers.gunicorn_body import (
    DIRECT_READ,
    GunicornLengthInput,
    client_left,
    request_body_input,
)
from .target import app_mount
from .types import Environ, StartResponse, WSGIApp
from .upstreams import Upstream
from .websocket.handshake import is_websocket_request, plan_handshake
from .websocket.tunnel import TUNNELS, answer_handshake

T = TypeVar("T")

# Set by dualproxy's a2wsgi bridge: a threading.Event raised when the ASGI
# server reports the client gone (WSGI itself has no way to say so).
CLIENT_GONE_KEY = "dualproxy.client_gone"
# Set by the face in the bridge's ASGI scope: its client_timeout, which the bridge
# applies to each receive() of the request body (a2wsgi's reads have no timeout).
CLIENT_TIMEOUT_KEY = "dualproxy.client_timeout"


def _environ_headers(environ: Environ) -> list[tuple[bytes, bytes]]:
    scope = environ.get("asgi.scope")
    if isinstance(scope, dict) and "headers" in scope:
        # Under a2wsgi the ASGI scope still has the exact header list.
        return list(scope["headers"])
    headers: list[tuple[bytes, bytes]] = []
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            name = key[5:].lower().replace("_", "-")
        elif key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            if not value:
                continue
            name = key.lower().replace("_", "-")
        else:
            continue
        headers.append((name.encode("latin-1"), value.encode("latin-1")))
    return headers


def _environ_target(environ: Environ) -> bytes:
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw:
        return str(raw).encode("latin-1")
    scope = environ.get("asgi.scope")
    if isinstance(scope, dict) and scope.get("raw_path"):
        query = scope.get("query_string", b"")
        return bytes(scope["raw_path"]) + (b"?" + query if query else b"")
    # Last resort for servers that keep no raw target: re-encode the decoded path.
    path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    target = quote(path.encode("latin-1"), safe="/;=:@!$&'()*+,~-._").encode("ascii")
    query = environ.get("QUERY_STRING", "")
    return target + (b"?" + query.encode("latin-1") if query else b"")


def incoming_from_environ(environ: Environ) -> IncomingRequest:
    """The neutral request for a WSGI environ, from the raw target where the server keeps one."""
    target = _environ_target(environ)
    mount = app_mount(target.split(b"?", 1)[0], environ.get("SCRIPT_NAME", "").encode("latin-1"))
    protocol = environ.get("SERVER_PROTOCOL", "HTTP/1.1")
    return IncomingRequest(
        method=environ["REQUEST_METHOD"],
        target=target,
        headers=_environ_headers(environ),
        peer=environ.get("REMOTE_ADDR") or None,
        scheme=environ.get("wsgi.url_scheme", "http"),
        mount=mount,
        http_version=protocol.partition("/")[2] or "1.1",
    )


def _str_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in headers]


def problem_response(start_response: StartResponse, exc: ProxyError,
                     environ: Environ | None = None) -> list[bytes]:
    headers = exc.headers()
    if environ is None or "asgi.scope" not in environ:
        # PEP 3333 forbids hop-by-hop headers in a WSGI response (wsgiref and
        # waitress refuse them); only the ASGI server under the bridge is told
        # to close. gunicorn closes or drains by its own framing anyway.
        headers = [(name, value) for name, value in headers if name != b"connection"]
    start_response(f"{exc.status} {exc.title}", _str_headers(headers))
    return [exc.body()]


class SyncProxy(ProxyFace[httpx.Client, httpx.BaseTransport, WSGIApp]):
    """WSGI reverse proxy. `SyncProxy("http://upstream:8080/base", mount="/api")`.

    Takes the same arguments as AsyncProxy (or the same `config=`, whose hooks
    must then be plain `def` functions), and an optional `httpx.Client(trust_env=False)`
    (its cookie jar is disabled; you close it; `core.check_user_client` says what it
    may and may not change). Outside the mount it answers 404, or
    calls `fallback` when one is given.
    """

    def __init__(self, upstream: str | Sequence[str] | None = None, **kwargs: Any) -> None:
        super().__init__(upstream, **kwargs)
        self.chain.require_sync()

    def _new_client(self) -> tuple[httpx.Client, httpx.BaseTransport]:
        return make_sync_client(self.config)

    def _send(self, request: httpx.Request) -> httpx.Response:
        return _send_via(self.client, self._transport, request)

    def _start_health(self, client: httpx.Client, transport: httpx.BaseTransport | None
                      ) -> Any:
        from .health import HealthThread

        return HealthThread(self.config, self.balancer,
                            functools.partial(_send_via, client, transport))

    def close(self) -> None:
        """Close the client if this proxy created it."""
        client = self._detach_client()
        if client is not None:
            client.close()

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        incoming = incoming_from_environ(environ)
        record = self.begin(incoming)
        # The environ lookup spares plain requests the header scan.
        websocket = "HTTP_UPGRADE" in environ and is_websocket_request(incoming.headers)
        try:
            exchange: Exchange | None = None
            if websocket:
                plan = run_request_hooks(self.config.request_hooks, plan_handshake(
                    self.config, incoming, routes=self.routes))
            else:
                plan = self.plan(incoming)
                if self.chain:
                    exchange = self.exchange(incoming, record, plan)
                    answer = run_sync(self.chain.request(exchange))
                    assert exchange.plan is not None
                    plan = exchange.plan
                    if answer is not None:
                        return self._answer(exchange, answer, start_response, environ)
        except NotProxied as exc:
            if self.fallback is not None:
                self.pass_on(record)
                return self.fallback(environ, start_response)
            return self._problem(start_response, exc, record, environ)
        except ProxyError as exc:
            return self._problem(start_response, exc, record, environ)
        if websocket:
            try:
                with TUNNELS.slot() as slot:
                    return slot.keep(self.attempts(record, plan, lambda upstream: answer_handshake(
                        self.config, plan, environ, start_response, record, self, upstream)))
            except ProxyError as exc:
                return self._problem(start_response, exc, record, environ)

        counter: BodyCounter | None = None
        body_input: Any = None
        content: Iterator[bytes] | None = None
        client_sock = environ.get("gunicorn.socket")
        if not isinstance(client_sock, socket.socket):
            client_sock = None
        gone = environ.get(CLIENT_GONE_KEY)
        restore_timeout: float | None = None
        if plan.has_body:
            counter = BodyCounter(plan, self.config)
            body_input = request_body_input(environ)
            content = _request_body(body_input, counter, self.config.chunk_size, record,
                                    self.config.client_timeout)
            if exchange is not None and exchange._request_pipeline is not None:
                content = transformed(exchange._request_pipeline, content)
            seconds = self.config.client_timeout
            if client_sock is not None:  # gunicorn: its reads of the body time out
                restore_timeout = client_sock.gettimeout()
                client_sock.settimeout(seconds)
            elif gone is not None:  # the bridge: it times each receive() out
                environ["asgi.scope"][CLIENT_TIMEOUT_KEY] = seconds
        stop_fd = DRAIN.wake_fd() if DRAIN.armed else None
        watch = (ClientWatch(client_sock, gone, stop_fd)
                 if client_sock is not None or gone is not None or stop_fd is not None
                 else None)
        upload = UploadCut(record, client_sock, gone) if plan.has_body and DRAIN.armed else None
        if upload is not None:
            DRAIN.enter(upload)

        def send_to(upstream: Upstream) -> tuple[httpx.Request, httpx.Response]:
            request = self.upstream_request(plan, content, upstream)
            if watch is not None:
                request.extensions[CLIENT_WATCH] = watch
            return request, self._send(request)

        try:
            with map_upstream_errors():
                request, response = self.attempts(record, plan, send_to)
        except ProxyError as exc:
            # record.shutdown: the upload was cut at the graceful timeout.
            problem = ShuttingDown() if record.shutdown else exc
            if counter is not None:
                _discard(body_input, discard_budget(counter, problem), self.config.chunk_size)
            return self._problem(start_response, problem, record, environ)
        except ClientDisconnected:
            if record.shutdown:
                return self._problem(start_response, ShuttingDown(), record, environ)
            # Nobody is left to read an answer, but WSGI still wants one.
            record.client_gone = True
            self.finish(record)
            return problem_response(start_response, IncompleteBody("the client went away"),
                                    environ)
        finally:
            if upload is not None:
                DRAIN.leave(upload)
            if client_sock is not None and plan.has_body:
                # The upload is over (or stopped by an early answer): the response's
                # writes wait for a slow reader as long as it takes.
                client_sock.settimeout(restore_timeout)
        try:
            head = self.response_head(record, plan, request, response)
            if exchange is not None:
                head = run_sync(self.chain.response(exchange, head))
            # Inside the try: a server that refuses the head (a header value it
            # rejects) must not leave the upstream response, and its pool slot, open.
            start_response(head.status_line, _str_headers(head.headers))
        except ProxyError as exc:
            response.close()
            return self._problem(start_response, exc, record, environ)
        except BaseException:
            response.close()
            self.finish(record)
            raise
        record.status = head.status
        body = ResponseBody(response, plan, record, self.finish, head.has_body, gone)
        body.client_socket = client_sock
        body.raw_stream = self._transport is not None
        if exchange is not None:
            body.pipeline = exchange._response_pipeline
        return body

    def _answer(self, exchange: Exchange, answer: Answer, start_response: StartResponse,
                environ: Environ) -> Iterable[bytes]:
        """A filter's own answer, through the filters outside it, to the client."""
        record = exchange.record
        try:
            head = run_sync(self.chain.response(exchange, self.answer_head(exchange, answer)))
            start_response(head.status_line, _str_headers(head.headers))
        except ProxyError as exc:
            return self._problem(start_response, exc, record, environ)
        except BaseException:
            self.finish(record)
            raise
        body = answer.body
        if not isinstance(body, (bytes, Iterable)):
            self.finish(record)
            raise TypeError("an async Answer body on the sync face")
        return AnswerBody(body, exchange, self.finish, head.has_body)

    def attempts(self, record: RequestRecord, plan: UpstreamPlan,
                 attempt: Callable[[Upstream], T]) -> T:
        """`attempt` on an upstream of the pool, then on others while `retry` allows."""
        tried: list[Upstream] = []
        upstream = self.choose(record)
        while True:
            try:
                return attempt(upstream)
            except Exception as exc:
                after = self.retry(record, plan, tried, exc)
                if after is None:
                    raise
                upstream = after

    def _problem(
        self, start_response: StartResponse, exc: ProxyError, record: RequestRecord,
        environ: Environ,
    ) -> list[bytes]:
        self.refuse(record, exc)
        self.finish(record)
        return problem_response(start_response, exc, environ)


class UploadCut:
    """Ends an upload still running at the graceful timeout (drain.py, its timer thread).

    The body read stops (gunicorn: the socket's read side is shut, so a blocked
    read ends; the a2wsgi bridge: its `gone` event), and the face answers 503.
    """

    __slots__ = ("record", "sock", "gone")

    def __init__(self, record: RequestRecord, sock: socket.socket | None,
                 gone: threading.Event | None) -> None:
        self.record, self.sock, self.gone = record, sock, gone

    def cut(self) -> None:
        self.record.shutdown = True
        if self.gone is not None:
            self.gone.set()
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass


class ResponseBody:
    """The WSGI response iterable: raw upstream chunks, closed with the response.

    An upstream failure mid-body raises UpstreamBroken out of the iteration,
    which makes every WSGI server drop the client connection instead of ending
    the response cleanly.
    """

    def __init__(
        self,
        response: httpx.Response,
        plan: UpstreamPlan,
        record: RequestRecord,
        finish: Callable[[RequestRecord], None],
        has_body: bool,
        gone: threading.Event | None,
    ) -> None:
        self.response = response
        self.plan = plan
        self.record = record
        self.finish = finish
        self.has_body = has_body
        self.gone = gone
        self._closed = False
        # Popped by whichever ends it first: close(), or the drain timer's cut().
        self._unlogged = [True]
        self.client_socket: socket.socket | None = None
        # Our own transport's stream is raw already: skip httpx's iter_raw wrappers.
        self.raw_stream = False
        self.pipeline: BodyPipeline | None = None  # the filters' body transforms
        if has_body:
            DRAIN.enter(self)
        else:
            record.responded = True

    def __iter__(self) -> Iterator[bytes]:
        if not self.has_body:
            return
        record = self.record
        gone = self.gone
        stream = self.response.stream
        chunks: Iterable[bytes] = (
            stream if self.raw_stream and isinstance(stream, httpx.SyncByteStream)
            else self.response.iter_raw())
        if self.pipeline is not None:
            chunks = transformed(self.pipeline, chunks)
        try:
            with map_stream_errors():
                for chunk in chunks:
                    if gone is not None and gone.is_set():
                        record.client_gone = True
                        return
                    if record.shutdown:  # cut(): the client socket is shut already
                        if self.client_socket is None:  # a2wsgi: leave the body unfinished
                            raise ClientDisconnected("cut at the graceful timeout")
                        return
                    record.bytes_out += len(chunk)
                    yield chunk
        except UpstreamBroken as exc:
            record.upstream_broke(exc)
            # gunicorn logs a traceback for an exception raised here. Shutting
            # the client socket aborts the response just as surely (no last
            # chunk, short body) and gunicorn ignores the EPIPE that follows.
            if self._shut_client():
                return
            raise
        record.responded = True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        DRAIN.leave(self)
        if not self.record.responded and not self.record.broken and self.has_body:
            self.record.client_gone = True
        self.response.close()
        self._finish()

    def cut(self) -> None:
        """The graceful timeout (drain.py, its timer thread): abort the body, log it now.

        The serving thread may be blocked on the upstream past gunicorn's kill, so
        the line is written here; the thread stops at its next chunk."""
        record = self.record
        if record.responded:
            return
        record.shutdown = True
        self._shut_client()
        self._finish()

    def _shut_client(self) -> bool:
        """Shut the client socket where the server gave one (gunicorn); False if none."""
        sock = self.client_socket
        if sock is None:
            return False
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        return True

    def _finish(self) -> None:
        try:
            self._unlogged.pop()  # atomic: one of the two threads gets it
        except IndexError:
            return
        self.finish(self.record)


class AnswerBody:
    """The WSGI response iterable of a filter's own answer (through the filters'
    body transforms); `close` ends the exchange."""

    def __init__(self, body: bytes | Iterable[bytes], exchange: Exchange,
                 finish: Callable[[RequestRecord], None], has_body: bool) -> None:
        self.body = body
        self.exchange = exchange
        self.finish = finish
        self.has_body = has_body
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        record = self.exchange.record
        if self.has_body:
            body = self.body
            chunks: Iterable[bytes] = (body,) if isinstance(body, bytes) else body
            try:
                for chunk in transformed(self.exchange._response_pipeline, chunks):
                    record.bytes_out += len(chunk)
                    yield chunk
            except UpstreamBroken as exc:
                record.upstream_broke(exc)
                raise
        record.responded = True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        record = self.exchange.record
        if not record.responded and not record.broken and self.has_body:
            record.client_gone = True
        closer = getattr(self.body, "close", None)
        if closer is not None:
            closer()
        self.finish(record)


def _send_via(client: httpx.Client, transport: httpx.BaseTransport | None,
              request: httpx.Request) -> httpx.Response:
    """Send through dualproxy's transport directly when the face made it, else the client."""
    if transport is not None:
        return transport.handle_request(request)
    return client.send(request, stream=True, follow_redirects=False)


def _discard(stream: Any, budget: int, chunk_size: int) -> None:
    """Read and drop up to `budget` bytes of the unread request body."""
    while budget > 0:
        try:
            chunk = stream.read(min(chunk_size, budget))
        except Exception:  # the client broke off: nothing left to keep in step
            return
        if not chunk:
            return
        budget -= len(chunk)


def _request_body(
    stream: Any, counter: BodyCounter, chunk_size: int, record: RequestRecord,
    client_timeout: float,
) -> Iterator[bytes]:
    """Read `wsgi.input` in chunks as httpx asks for them.

    gunicorn's `read(n)` blocks until n bytes or the end, so n stays modest and
    never exceeds what Content-Length still promises. A read that fails (client
    reset, malformed chunking), times out (`client_timeout`, core.client_stalled)
    or ends short aborts the upload: the upstream never sees a cut body completed.
    """
    if isinstance(stream, GunicornLengthInput):
        chunk_size = max(chunk_size, DIRECT_READ)  # its reads never wait for a full piece
    while True:
        remaining = counter.remaining()
        size = chunk_size if remaining is None else min(chunk_size, remaining)
        if size <= 0:
            break
        try:
            chunk = stream.read(size)
        except (ClientDisconnected, ProxyError):  # the bridge's, raised in this thread
            raise
        except TimeoutError:  # the client socket's timeout (gunicorn)
            raise client_stalled(client_timeout) from None
        except Exception as exc:
            if client_left(exc):
                raise ClientDisconnected("the client went away during the upload") from exc
            raise IncompleteBody(f"reading the request body failed: {describe(exc)}") from exc
        if not chunk:
            if remaining:  # the end of input before the declared length: the client left
                raise ClientDisconnected("the client went away during the upload")
            break
        counter.feed(len(chunk))
        record.bytes_in += len(chunk)
        yield chunk
    counter.finish()
