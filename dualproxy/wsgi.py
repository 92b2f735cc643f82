"""The sync face: a WSGI application that forwards with `httpx.Client`.

Translation and I/O only; every decision is the core's. No event loop and no
thread of its own: the request body is read from `wsgi.input` in chunks as
httpx sends it, and the response is an iterable whose `close()` (which servers
call when the client goes away) closes the upstream response at once.
"""

from __future__ import annotations

import io
import socket
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, Protocol
from urllib.parse import quote

import httpx

from .config import ProxyConfig
from .core import (
    BodyCounter,
    IncomingRequest,
    UpstreamPlan,
    build_request,
    disable_cookies,
    discard_budget,
    enter_body_phase,
    make_sync_client,
    plan_request,
    plan_response,
    response_header_list,
)
from .errors import (
    ClientDisconnected,
    IncompleteBody,
    NotProxied,
    ProxyError,
    UpstreamBroken,
    describe,
    map_stream_errors,
    map_upstream_errors,
)
from .http1 import CLIENT_WATCH, ClientWatch
from .logs import AccessLog, RequestRecord

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]
Environ = dict[str, Any]


class StartResponse(Protocol):
    def __call__(
        self, status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = ...
    ) -> Callable[[bytes], object]: ...


WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]

# Set by dualproxy's a2wsgi bridge: a threading.Event raised when the ASGI
# server reports the client gone (WSGI itself has no way to say so).
CLIENT_GONE_KEY = "dualproxy.client_gone"


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
    script = environ.get("SCRIPT_NAME", "").encode("latin-1").rstrip(b"/")
    path = target.split(b"?", 1)[0]
    mount = script if script and path.startswith(script) else b""
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


class SyncProxy:
    """WSGI reverse proxy. `SyncProxy("http://upstream:8080/base", mount="/api")`.

    Takes the same arguments as AsyncProxy (or the same `config=`), and an
    optional `httpx.Client` (its cookie jar is disabled; you close it). Outside
    the mount it answers 404, or calls `fallback` when one is given.
    """

    def __init__(
        self,
        upstream: str | None = None,
        *,
        config: ProxyConfig | None = None,
        client: httpx.Client | None = None,
        fallback: WSGIApp | None = None,
        access_log: bool = True,
        **options: Any,
    ) -> None:
        if config is None:
            if upstream is None:
                raise TypeError("SyncProxy needs an upstream URL or a config")
            config = ProxyConfig.build(upstream, **options)
        elif upstream is not None or options:
            raise TypeError("pass either config= or upstream/options, not both")
        self.config = config
        self.fallback = fallback
        self._client = client
        self._transport: httpx.BaseTransport | None = None
        self._owns_client = client is None
        self._lock = threading.Lock()
        if client is not None:
            disable_cookies(client)
        self._log = AccessLog(enabled=access_log)

    @property
    def client(self) -> httpx.Client:
        """The upstream client, created on first use (after a pre-fork server has forked)."""
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    self._client, self._transport = make_sync_client(self.config)
                client = self._client
        return client

    def _send(self, request: httpx.Request) -> httpx.Response:
        client = self.client
        if self._transport is not None:
            return self._transport.handle_request(request)
        return client.send(request, stream=True)

    def close(self) -> None:
        """Close the client if this proxy created it."""
        if self._client is not None and self._owns_client:
            self._client.close()
            self._client = self._transport = None

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        incoming = incoming_from_environ(environ)
        record = self._log.start(incoming)
        try:
            plan = plan_request(self.config, incoming)
            for request_hook in self.config.request_hooks:
                plan = request_hook(plan) or plan  # type: ignore[assignment]
        except NotProxied as exc:
            if self.fallback is not None:
                return self.fallback(environ, start_response)
            return self._problem(start_response, exc, record, environ)
        except ProxyError as exc:
            return self._problem(start_response, exc, record, environ)

        counter: BodyCounter | None = None
        body_input: Any = None
        content: Iterator[bytes] | None = None
        if plan.has_body:
            counter = BodyCounter(plan, self.config)
            body_input = _body_input(environ)
            content = _request_body(body_input, counter, self.config.chunk_size, record)
        request = build_request(self.config, plan, content)
        client_sock = environ.get("gunicorn.socket")
        if not isinstance(client_sock, socket.socket):
            client_sock = None
        gone = environ.get(CLIENT_GONE_KEY)
        if client_sock is not None or gone is not None:
            request.extensions[CLIENT_WATCH] = ClientWatch(client_sock, gone)
        try:
            with map_upstream_errors():
                response = self._send(request)
        except ProxyError as exc:
            if counter is not None:
                _discard(body_input, discard_budget(counter, exc), self.config.chunk_size)
            return self._problem(start_response, exc, record, environ)
        except ClientDisconnected:
            # Nobody is left to read an answer, but WSGI still wants one.
            record.client_gone = True
            self._log.finish(record)
            return problem_response(start_response, IncompleteBody("the client went away"),
                                    environ)
        record.upstream_status(response.status_code)
        try:
            enter_body_phase(request, self.config)
            head = plan_response(self.config, plan, response.status_code,
                                 response_header_list(response))
            for response_hook in self.config.response_hooks:
                head = response_hook(plan, head) or head  # type: ignore[assignment]
        except ProxyError as exc:
            response.close()
            return self._problem(start_response, exc, record, environ)
        except BaseException:
            response.close()
            raise
        start_response(head.status_line, _str_headers(head.headers))
        record.status = head.status
        body = ResponseBody(response, plan, record, self._log, head.has_body, gone)
        body.client_socket = client_sock
        body.raw_stream = self._transport is not None
        return body

    def _problem(
        self, start_response: StartResponse, exc: ProxyError, record: RequestRecord,
        environ: Environ,
    ) -> list[bytes]:
        self._log.problem(record, exc)
        self._log.finish(record)
        return problem_response(start_response, exc, environ)


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
        log: AccessLog,
        has_body: bool,
        gone: threading.Event | None,
    ) -> None:
        self.response = response
        self.plan = plan
        self.record = record
        self.log = log
        self.has_body = has_body
        self.gone = gone
        self._closed = False
        self.client_socket: socket.socket | None = None
        # Our own transport's stream is raw already: skip httpx's iter_raw wrappers.
        self.raw_stream = False
        if not has_body:
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
        try:
            with map_stream_errors():
                for chunk in chunks:
                    if gone is not None and gone.is_set():
                        record.client_gone = True
                        return
                    record.bytes_out += len(chunk)
                    yield chunk
        except UpstreamBroken as exc:
            record.broken = describe(exc)
            sock = self.client_socket
            if sock is not None:
                # gunicorn logs a traceback for an exception raised here. Shutting
                # the client socket aborts the response just as surely (no last
                # chunk, short body) and gunicorn ignores the EPIPE that follows.
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            raise
        record.responded = True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.record.responded and not self.record.broken and self.has_body:
            self.record.client_gone = True
        self.response.close()
        self.log.finish(self.record)


# Largest read from the client socket when gunicorn's input is read directly.
# Such a read returns whatever has arrived (it never waits for a full piece),
# so a big bound costs a slow upload nothing and saves a fast one iterations.
DIRECT_READ = 262144


class GunicornLengthInput:
    """gunicorn's `wsgi.input` for a Content-Length body, read straight off the socket.

    gunicorn's own `read(n)` blocks until n bytes, and its unreader re-copies
    the read-ahead it keeps (up to 1 MiB, in a BytesIO) on every call: a fast
    upload spends most of its CPU copying. This reads what gunicorn already
    buffered first, then recv()s the socket itself, and keeps gunicorn's
    bookkeeping exact: the reader's remaining length drops by every byte taken
    (so gunicorn sees the body consumed and the next request on a keep-alive
    connection starts where it should), bytes past the body stay in gunicorn's
    buffer, and a failed read marks the body failed (the connection closes).
    """

    __slots__ = ("body", "reader", "unreader", "sock")

    def __init__(self, body: Any, reader: Any, unreader: Any, sock: socket.socket) -> None:
        self.body = body
        self.reader = reader
        self.unreader = unreader
        self.sock = sock

    @classmethod
    def recognise(cls, stream: Any) -> GunicornLengthInput | None:
        """The direct reader when `stream` is exactly gunicorn's known shape, else None."""
        body_mod = sys.modules.get("gunicorn.http.body")
        unreader_mod = sys.modules.get("gunicorn.http.unreader")
        if body_mod is None or unreader_mod is None:
            return None
        if type(stream) is not getattr(body_mod, "Body", None):
            return None
        reader = getattr(stream, "reader", None)
        if type(reader) is not getattr(body_mod, "LengthReader", None):
            return None
        unreader = getattr(reader, "unreader", None)
        if type(unreader) is not getattr(unreader_mod, "SocketUnreader", None):
            return None
        sock = getattr(unreader, "sock", None)
        if not (isinstance(sock, socket.socket) and isinstance(getattr(reader, "length", None), int)
                and isinstance(getattr(stream, "buf", None), io.BytesIO)
                and isinstance(getattr(unreader, "buf", None), io.BytesIO)
                and isinstance(getattr(stream, "failed", None), bool)):
            return None
        return cls(stream, reader, unreader, sock)

    def read(self, size: int) -> bytes:
        """Up to `size` bytes of the body, as soon as any are there; b"" at its end."""
        # Bytes gunicorn's Body already took from its reader (a read that asked
        # for more than the caller wanted) come first; they are counted already.
        data = _take_buffered(self.body, size)
        if data:
            return data
        reader = self.reader
        size = min(size, reader.length)
        if size <= 0:
            return b""
        # Then read-ahead from the head: the body's share of it (pipelined bytes
        # past the body stay where gunicorn expects them), then the socket.
        data = _take_buffered(self.unreader, size)
        if not data:
            try:
                data = self.sock.recv(size)
            except BaseException:
                self.body.failed = True
                raise
            if not data:
                self.body.failed = True  # the client left mid-body: never reuse
                return b""
        reader.length -= len(data)
        return data


def _take_buffered(owner: Any, size: int) -> bytes:
    """Up to `size` bytes from the front of `owner.buf`, a gunicorn BytesIO that is
    appended at its end; the rest stays there, as gunicorn's own reads leave it."""
    buf = owner.buf
    buf.seek(0, io.SEEK_END)
    if not buf.tell():
        return b""
    data: bytes = buf.getvalue()
    owner.buf = rest = io.BytesIO()
    rest.write(data[size:])
    return data[:size]


def _body_input(environ: Environ) -> Any:
    """Where to read the request body: gunicorn's socket directly when safe, else wsgi.input."""
    stream = environ["wsgi.input"]
    return GunicornLengthInput.recognise(stream) or stream


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
    stream: Any, counter: BodyCounter, chunk_size: int, record: RequestRecord
) -> Iterator[bytes]:
    """Read `wsgi.input` in chunks as httpx asks for them.

    gunicorn's `read(n)` blocks until n bytes or the end, so n stays modest and
    never exceeds what Content-Length still promises. A read that fails (client
    reset, malformed chunking) or ends short aborts the upload: the upstream
    never sees a cut body completed.
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
        except ClientDisconnected:
            raise
        except Exception as exc:
            raise IncompleteBody(f"reading the request body failed: {describe(exc)}") from exc
        if not chunk:
            break
        counter.feed(len(chunk))
        record.bytes_in += len(chunk)
        yield chunk
    counter.finish()
