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

from .body_input import body_reader, client_left, read_size
from .core import (
    BodyCounter,
    IncomingRequest,
    ResponseHead,
    UpstreamPlan,
    client_stalled,
)
from .drain import DRAIN
from .errors import (
    ClientDisconnected,
    IncompleteBody,
    ProxyError,
    ShuttingDown,
    UpstreamBroken,
    describe,
    map_stream_errors,
)
from .exchange import answer_body_chunks, drive_sync, handshake_flow, http_flow
from .face import ProxyFace, make_sync_client
from .filters import Exchange
from .filters.chain import BodyPipeline, transformed
from .http1 import CLIENT_WATCH, ClientWatch, UpstreamTransport
from .http1.pool import Call, Reply
from .logs import RequestRecord
from .target import app_mount
from .types import Environ, StartResponse, WSGIApp
from .upstreams import Upstream
from .websocket.handshake import is_websocket_request
from .websocket.tunnel import TunnelSteps

T = TypeVar("T")

# Set by dualproxy's a2wsgi bridge: a threading.Event raised when the ASGI
# server reports the client gone (WSGI itself has no way to say so).
CLIENT_GONE_KEY = "dualproxy.client_gone"
# Set by the face in the bridge's ASGI scope: its client_timeout, which the bridge
# applies to each receive() of the request body (a2wsgi's reads have no timeout).
CLIENT_TIMEOUT_KEY = "dualproxy.client_timeout"


# The two header fields CGI names without the HTTP_ prefix.
_CONTENT_KEYS = frozenset({"CONTENT_TYPE", "CONTENT_LENGTH"})


def _header_name(key: str) -> bytes | None:
    """The header name an environ key stands for (`HTTP_USER_AGENT`: b"user-agent"),
    None for a key that is no header."""
    if key.startswith("HTTP_"):
        return key[5:].lower().replace("_", "-").encode("latin-1")
    if key in _CONTENT_KEYS:
        return key.lower().replace("_", "-").encode("latin-1")
    return None


# environ key -> _header_name(key), for the keys seen so far (the same few dozen on
# every request); bounded, as the keys come from the clients' header names.
_HEADER_NAMES: dict[str, bytes | None] = {}
_HEADER_NAMES_MAX = 1024


def _environ_headers(environ: Environ) -> list[tuple[bytes, bytes]]:
    scope = environ.get("asgi.scope")
    if isinstance(scope, dict) and "headers" in scope:
        # Under a2wsgi the ASGI scope still has the exact header list.
        return list(scope["headers"])
    headers: list[tuple[bytes, bytes]] = []
    names = _HEADER_NAMES
    for key, value in environ.items():
        try:
            name = names[key]
        except KeyError:
            name = _header_name(key)
            if len(names) < _HEADER_NAMES_MAX:
                names[key] = name
        if name is None or (not value and key in _CONTENT_KEYS):
            continue
        headers.append((name, value.encode("latin-1")))
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
    script_name = environ.get("SCRIPT_NAME")
    # No SCRIPT_NAME (the usual): no mount the enclosing app routed on (app_mount's b"").
    mount = (app_mount(target.split(b"?", 1)[0], script_name.encode("latin-1"))
             if script_name else b"")
    protocol = environ.get("SERVER_PROTOCOL", "HTTP/1.1")
    return IncomingRequest(environ["REQUEST_METHOD"], target, _environ_headers(environ),
                           environ.get("REMOTE_ADDR") or None,
                           environ.get("wsgi.url_scheme", "http"), mount,
                           protocol.partition("/")[2] or "1.1")


def _str_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in headers]


def start_head(start_response: StartResponse, head: ResponseHead) -> None:
    """`start_response` with the core's head. dualproxy's bridge (bridge.py) takes it
    as it is, when its own start_response is the one given (no middleware in between)."""
    fast = getattr(getattr(start_response, "__self__", None), "start_response_bytes", None)
    if fast is not None:
        fast(head.status, head.headers)
    else:
        start_response(head.status_line, _str_headers(head.headers))


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
        """Close the client if this proxy created it, and what the filters hold."""
        client = self._detach_client()
        if client is not None:
            client.close()
        self.chain.close()

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        incoming = incoming_from_environ(environ)
        record = self.begin(incoming)
        # The environ lookup spares plain requests the header scan.
        if "HTTP_UPGRADE" in environ and is_websocket_request(incoming.headers):
            tunnel = TunnelPort(self, environ, start_response, record)
            try:
                return drive_sync(handshake_flow(self, incoming, record, tunnel))
            finally:
                tunnel.close()
        return drive_sync(http_flow(self, incoming, record,
                                    HttpPort(self, environ, start_response, record)))

    def _problem(
        self, start_response: StartResponse, exc: ProxyError, record: RequestRecord,
        environ: Environ,
    ) -> list[bytes]:
        self.refuse(record, exc)
        self.finish(record)
        return problem_response(start_response, exc, environ)


class Port:
    """What a WSGI exchange and a WebSocket handshake answer alike: the fallback,
    a problem, a filter's own answer (exchange.HttpPort/HandshakePort)."""

    def __init__(self, proxy: SyncProxy, environ: Environ, start_response: StartResponse,
                 record: RequestRecord) -> None:
        self.proxy, self.environ, self.start_response = proxy, environ, start_response
        self.record = record

    def fallback(self) -> Iterable[bytes]:
        assert self.proxy.fallback is not None
        return self.proxy.fallback(self.environ, self.start_response)

    def problem(self, exc: ProxyError) -> Iterable[bytes]:
        return self.proxy._problem(self.start_response, exc, self.record, self.environ)

    def answer(self, exchange: Exchange, head: ResponseHead, body: Any) -> Iterable[bytes]:
        """A filter's own answer, through the filters outside it, to the client."""
        if not isinstance(body, (bytes, Iterable)):
            self.proxy.finish(self.record)
            raise TypeError("an async Answer body on the sync face")
        try:
            start_head(self.start_response, head)
        except BaseException:
            self.proxy.finish(self.record)
            raise
        self.record.status = head.status
        return AnswerBody(body, exchange, self.proxy.finish, head.has_body)


class HttpPort(Port):
    """One HTTP exchange's I/O on the WSGI face (exchange.HttpPort): the body read
    from `wsgi.input` (or the server's faster reader), the client watch, the drain's
    upload cut, and the response iterable."""

    plan: UpstreamPlan
    counter: BodyCounter | None = None
    body_input: Any = None
    content: Iterator[bytes] | None = None
    client_sock: socket.socket | None = None
    gone_event: threading.Event | None = None
    watch: ClientWatch | None = None
    upload_cut: UploadCut | None = None
    restore: bool = False
    restore_timeout: float | None = None

    def upload(self, plan: UpstreamPlan, exchange: Exchange | None) -> None:
        environ, config, record = self.environ, self.proxy.config, self.record
        self.plan = plan
        client_sock = environ.get("gunicorn.socket")
        if not isinstance(client_sock, socket.socket):
            client_sock = None
        self.client_sock = client_sock
        self.gone_event = gone = environ.get(CLIENT_GONE_KEY)
        if plan.has_body:
            self.counter = BodyCounter(plan, config)
            self.body_input = body_reader(environ)
            content = _request_body(self.body_input, self.counter, config.chunk_size, record,
                                    config.client_timeout)
            if exchange is not None and exchange._request_pipeline is not None:
                content = transformed(exchange._request_pipeline, content)
            self.content = content
            seconds = config.client_timeout
            if client_sock is not None:  # gunicorn: its reads of the body time out
                self.restore, self.restore_timeout = True, client_sock.gettimeout()
                client_sock.settimeout(seconds)
            elif gone is not None:  # the bridge: it times each receive() out
                environ["asgi.scope"][CLIENT_TIMEOUT_KEY] = seconds
        stop_fd = DRAIN.wake_fd() if DRAIN.armed else None
        if client_sock is not None or gone is not None or stop_fd is not None:
            self.watch = ClientWatch(client_sock, gone, stop_fd)
        if plan.has_body and DRAIN.armed:
            self.upload_cut = UploadCut(record, client_sock, gone)
            DRAIN.enter(self.upload_cut)

    def attempt(self, upstream: Upstream,
                ) -> tuple[httpx.Request, httpx.Response] | tuple[Call, Reply]:
        proxy = self.proxy
        transport = proxy._transport
        if isinstance(transport, UpstreamTransport):  # ours: no httpx objects
            call = proxy.upstream_call(self.plan, self.content, upstream)
            if self.watch is not None:
                call.extensions[CLIENT_WATCH] = self.watch
            return call, transport.send(call)
        request = proxy.upstream_request(self.plan, self.content, upstream)
        if self.watch is not None:
            request.extensions[CLIENT_WATCH] = self.watch
        return request, proxy._send(request)

    def discard(self, budget: int) -> bool:
        """Read and drop up to `budget` bytes of the request body nothing read yet
        (exchange.drop_unread); True when its end was reached."""
        stream = self.body_input if self.body_input is not None else body_reader(self.environ)
        chunk_size = self.proxy.config.chunk_size
        while True:
            try:  # past the budget, one byte more tells the end from more body
                chunk = stream.read(min(chunk_size, budget) if budget > 0 else 1)
            except Exception:  # the client broke off, or stalled: nothing to keep in step
                return False
            if not chunk:
                return True
            budget -= len(chunk)
            if budget < 0:
                return False

    def refused(self, exc: ProxyError) -> Iterable[bytes]:
        # record.shutdown: the upload was cut at the graceful timeout.
        problem = ShuttingDown() if self.record.shutdown else exc
        self.upload_over()
        return self.problem(problem)

    def gone(self) -> Iterable[bytes]:
        self.upload_over()
        if self.record.shutdown:
            return self.problem(ShuttingDown())
        # Nobody is left to read an answer, but WSGI still wants one.
        self.record.client_gone = True
        self.proxy.finish(self.record)
        return problem_response(self.start_response, IncompleteBody("the client went away"),
                                self.environ)

    def upload_over(self) -> None:
        if self.upload_cut is not None:
            DRAIN.leave(self.upload_cut)
            self.upload_cut = None
        if self.restore:
            # The upload is over (or stopped by an early answer): the response's
            # writes wait for a slow reader as long as it takes.
            self.restore = False
            assert self.client_sock is not None
            self.client_sock.settimeout(self.restore_timeout)

    def abandon(self, response: httpx.Response | Reply, exc: ProxyError | None
                ) -> Iterable[bytes]:
        response.close()
        if exc is not None:
            return self.problem(exc)
        self.proxy.finish(self.record)
        return ()

    def relay(self, head: ResponseHead, response: httpx.Response | Reply,
              exchange: Exchange | None) -> Iterable[bytes]:
        record = self.record
        try:
            # A server that refuses the head (a header value it rejects) must not
            # leave the upstream response, and its pool slot, open.
            start_head(self.start_response, head)
        except BaseException:
            response.close()
            self.proxy.finish(record)
            raise
        record.status = head.status
        body = ResponseBody(response, self.plan, record, self.proxy.finish, head.has_body,
                            self.gone_event)
        body.client_socket = self.client_sock
        if exchange is not None:
            body.pipeline = exchange._response_pipeline
        return body


class TunnelPort(Port, TunnelSteps):
    """One WebSocket handshake's I/O on the WSGI face (exchange.HandshakePort)."""


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
        response: httpx.Response | Reply,
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
        response = self.response
        # Our own transport's stream is raw already: no httpx wrappers.
        chunks: Iterable[bytes] = (response.stream if isinstance(response, Reply)
                                   else response.iter_raw())
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
        self.record.closed(self.has_body)
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
        body = self.body
        if self.has_body and type(body) is bytes and self.exchange._response_pipeline is None:
            # A whole body and nothing to run over it (a cache hit's): as it is.
            record.bytes_out += len(body)
            yield body
        elif self.has_body:
            try:
                for chunk in transformed(self.exchange._response_pipeline,
                                         answer_body_chunks(self.body)):
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
        record.closed(self.has_body)
        body = self.body
        closer = None if type(body) is bytes else getattr(body, "close", None)
        if closer is not None:
            closer()
        self.finish(record)


def _send_via(client: httpx.Client, transport: httpx.BaseTransport | None,
              request: httpx.Request) -> httpx.Response:
    """Send through dualproxy's transport directly when the face made it, else the client."""
    if transport is not None:
        return transport.handle_request(request)
    return client.send(request, stream=True, follow_redirects=False)


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
    chunk_size = read_size(stream, chunk_size)  # a direct reader never waits for a full piece
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
