"""WSGI on an ASGI server: a2wsgi's bridge, plus the two things it does not carry.

a2wsgi's `WSGIMiddleware` runs the WSGI app in a thread pool. It keeps the ASGI
scope in `environ["asgi.scope"]` (the WSGI face reads the raw path and exact
headers from it) but reports a client that disconnects mid-upload as a clean
end of input, and never tells the app that the client went away during the
download. This bridge raises ClientDisconnected into the reading thread for
the first, and sets the `dualproxy.client_gone` event for the second: watched
from the end of the request body on (so a wait for the upstream's head ends
too), or from the response's start when the upstream answered before the
upload ended (the rest of the body is then never read: dropped here).

The parts of a2wsgi on a request's path are replaced for speed, behaviour kept
(a2wsgi answers only the lifespan here):

- its thread pool (`ThreadPoolExecutor` behind `run_in_executor`: per request a
  concurrent and an asyncio future chained by callbacks, a work item, a
  semaphore and a second wake-up of the loop for the thread's end) by `_Pool`,
  whose threads take jobs from a queue; the thread's end is its last message
  to the loop, and its failure goes with it;
- its responder, which waited for the event loop on every message the WSGI
  thread sent (a round trip through `run_coroutine_threadsafe` for the head,
  each chunk and the end): here the thread posts them and wakes the loop only
  when it sleeps, and waits only when more than `SEND_WINDOW` bytes are unsent;
- its `build_environ`, the same environ, with each header name's environ key
  worked out once (`_environ_key`) and its SCRIPT_NAME override read once;
- its request body: a direct reader (body_input.py) hands over each received
  message as it comes instead of gathering `read(n)`'s n bytes.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import queue
import sys
import threading
from collections import deque
from typing import Any, Protocol, cast

from a2wsgi import WSGIMiddleware
from a2wsgi.wsgi import Body, unicode_to_wsgi

from . import body_input
from .asgi import receive_within
from .drain import absorb_cancel
from .errors import RESPONSE_ABORTED, ClientDisconnected, UpstreamBroken
from .router import SyncRouter, async_twin
from .types import ASGIApp, Environ, Message, Receive, Scope, Send, StartResponse, WSGIApp
from .wsgi import CLIENT_GONE_KEY, CLIENT_TIMEOUT_KEY, SyncProxy

log = logging.getLogger("dualproxy")


class WSGIBridge:
    """An ASGI app serving a WSGI app in `threads` threads, with disconnects reported.

    WSGI cannot hold a WebSocket on an ASGI server: `websocket` scopes go to
    `websocket` (by default, for a SyncProxy, an AsyncProxy on the same config; for a
    SyncRouter, an AsyncRouter on the same routes).
    """

    def __init__(self, app: WSGIApp, *, threads: int = 32,
                 websocket: ASGIApp | None = None) -> None:
        self.app = app
        self._pool = _Pool(threads)
        # The lifespan (and a WebSocket scope nobody serves) as a2wsgi answers them.
        self._inner = cast(ASGIApp, WSGIMiddleware(app, workers=1))  # type: ignore[arg-type]
        # a2wsgi's SCRIPT_NAME from the environment, which replaces the scope's root_path.
        script_name = os.environ.get("SCRIPT_NAME", "")
        self._script_name = cast(str, unicode_to_wsgi(script_name))  # type: ignore[no-untyped-call]
        if websocket is None and isinstance(app, SyncProxy):
            websocket = async_twin(app)
        elif websocket is None and isinstance(app, SyncRouter):
            websocket = app.asgi_twin()
        self.websocket = websocket

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and self.websocket is not None:
            await self.websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            try:
                await self._inner(scope, receive, send)
            except asyncio.CancelledError:  # a forced stop skips lifespan.shutdown
                if not absorb_cancel():
                    raise
            return
        gone = _GoneEvent()
        names = [name for name, _ in scope["headers"]]
        has_body = b"content-length" in names or b"transfer-encoding" in names
        if has_body:  # the face adds CLIENT_TIMEOUT_KEY to environ["asgi.scope"]
            scope = dict(scope)
        watcher: _Cancellable | None = None

        async def guarded_receive() -> Message:
            nonlocal watcher
            if watcher is not None:
                # The body is over and the watcher owns receive() (two readers would
                # steal each other's messages): answer as the server would.
                if gone.is_set():
                    raise ClientDisconnected("client went away")
                return {"type": "http.request", "body": b"", "more_body": False}
            if gone.is_set():  # the drain cut the upload (wsgi.UploadCut)
                raise ClientDisconnected("the upload was cut")
            seconds: float | None = scope.get(CLIENT_TIMEOUT_KEY)
            if seconds is None:
                message = await receive()
            else:
                message = await receive_within(receive, seconds)
            if message["type"] == "http.disconnect":
                gone.set()
                raise ClientDisconnected("client went away")
            if not message.get("more_body", False):
                # From here on only a disconnect can come: watch for it while the
                # WSGI side waits for the upstream's head and streams the answer.
                watcher = start_watch(receive, gone)
            return message

        # No framing header, no body: nothing to read ahead (wsgi.input is empty).
        body = (_ReadAhead(guarded_receive, receive, gone, lambda: watcher is not None)
                if has_body else None)

        def started() -> None:
            nonlocal watcher
            if watcher is None:
                # The app answers, so it reads no more of the body (the WSGI face
                # reads none after the upstream's head): receive() is free to watch,
                # or the body's reader, if it runs, watches from now on.
                watcher = (body and body.watch()) or start_watch(receive, gone)

        if not has_body:
            watcher = start_watch(receive, gone)
        responder = _Responder(self.app, started)
        try:
            await responder(self._pool, self._environ(scope, _BridgeBody(body), gone), send)
        except (UpstreamBroken, ClientDisconnected):
            # Returning without completing the response makes the server drop
            # the connection: the client never sees a cut body as complete.
            RESPONSE_ABORTED.set(True)
        except asyncio.CancelledError:
            gone.set()  # the WSGI thread stops at its next chunk
            if not absorb_cancel():  # past the drain the cut was logged already
                raise
        finally:
            if watcher is not None:
                watcher.cancel()
            if body is not None:
                body.stop()

    def _environ(self, scope: Scope, body: _BridgeBody, gone: threading.Event) -> Environ:
        """a2wsgi's environ for `scope` (build_environ), with `dualproxy.client_gone`."""
        # WSGI's str of bytes: the UTF-8 text as latin-1 (an ASCII text stays itself).
        root_path = scope.get("root_path")
        script_name = (root_path if root_path.isascii() else
                       root_path.encode("utf8").decode("latin1")) if root_path else ""
        path_info = scope["path"]
        if not path_info.isascii():
            path_info = path_info.encode("utf8").decode("latin1")
        if script_name and path_info.startswith(script_name):
            path_info = path_info[len(script_name):]
        server_addr, server_port = scope.get("server") or ("localhost", 80)
        version = scope["http_version"]
        environ: Environ = {
            "asgi.scope": scope,
            "REQUEST_METHOD": scope["method"],
            "SCRIPT_NAME": self._script_name or script_name,
            "PATH_INFO": path_info,
            "QUERY_STRING": scope["query_string"].decode("ascii"),
            "SERVER_PROTOCOL": _PROTOCOLS.get(version) or f"HTTP/{version}",
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": scope.get("scheme", "http"),
            "wsgi.input": body,
            "wsgi.errors": sys.stdout,
            "wsgi.multithread": True,
            "wsgi.multiprocess": True,
            "wsgi.run_once": False,
            "SERVER_NAME": server_addr,
            "SERVER_PORT": str(server_port or 0),
            CLIENT_GONE_KEY: gone,
        }
        client = scope.get("client")
        if client is not None:
            environ["REMOTE_ADDR"], port = client
            environ["REMOTE_PORT"] = str(port)
        keys = _ENVIRON_KEYS
        for name, value in scope.get("headers", ()):
            key = keys.get(name) or _environ_key(name)
            text = value.decode("latin1")
            if key in environ:  # a repeated field: comma-joined, as a2wsgi does
                text = environ[key] + "," + text
            environ[key] = text
        return environ


_PROTOCOLS = {version: f"HTTP/{version}" for version in ("1.0", "1.1", "2")}
# header name -> its environ key (b"user-agent": "HTTP_USER_AGENT"), for the names seen
# so far (the same few dozen on every request); bounded, as clients choose the names.
_ENVIRON_KEYS: dict[bytes, str] = {}
_ENVIRON_KEYS_MAX = 1024


def _environ_key(name: bytes) -> str:
    """a2wsgi's environ key for a header name."""
    text = name.decode("latin1")
    if text == "content-length":
        key = "CONTENT_LENGTH"
    elif text == "content-type":
        key = "CONTENT_TYPE"
    else:
        key = f"HTTP_{text}".upper().replace("-", "_")
    if len(_ENVIRON_KEYS) < _ENVIRON_KEYS_MAX:
        _ENVIRON_KEYS[name] = key
    return key


_COND_LOCK = threading.Lock()


class _GoneEvent(threading.Event):
    """`dualproxy.client_gone`: a threading.Event whose Condition is made on its first
    set(), clear() or wait(). Most exchanges only ask is_set(), and a Condition's
    making (Python code: a lock, its bound methods) was a visible part of a request.
    Every public method is its own (the same logic as threading.Event's), so nothing
    leans on the base class's private attributes; the base stays for isinstance and
    the type."""

    __slots__ = ("_gone", "_gone_cond")

    def __init__(self) -> None:  # not threading.Event's: no Condition yet
        self._gone = False
        self._gone_cond: threading.Condition | None = None

    def _condition(self) -> threading.Condition:
        cond = self._gone_cond
        if cond is None:
            with _COND_LOCK:  # one Condition, also when two threads ask at once
                cond = self._gone_cond
                if cond is None:
                    cond = self._gone_cond = threading.Condition(threading.Lock())
        return cond

    def is_set(self) -> bool:
        return self._gone

    def set(self) -> None:
        cond = self._condition()
        with cond:
            self._gone = True
            cond.notify_all()

    def clear(self) -> None:
        with self._condition():
            self._gone = False

    def wait(self, timeout: float | None = None) -> bool:
        cond = self._condition()
        with cond:
            if not self._gone:
                cond.wait(timeout)
            return self._gone

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {'set' if self._gone else 'unset'}>"


class _Cancellable(Protocol):
    def cancel(self) -> Any: ...


def start_watch(receive: Receive, gone: threading.Event) -> _Cancellable:
    """Watch for the client's disconnect (the request body is over, or the app reads
    no more of it): `gone` is set when it comes; `cancel()` ends the watch."""
    return _Watch(receive, gone)


async def watch_disconnect(receive: Receive, gone: threading.Event) -> None:
    """Once the request body is over only a disconnect can come: wait for it, and set
    `gone` (the WSGI face's `dualproxy.client_gone`)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            gone.set()
            return


class _Watch:
    """watch_disconnect by callbacks: each receive() that returns a future (granian's
    do) is watched without a task; one that returns a coroutine (uvicorn's) runs in a
    task of its own (so a watch cancelled early leaves no coroutine never awaited).

    Each future's callback is removed once it is over (done, or the watch ended):
    granian's future keeps its callback for good and hides it from the garbage
    collector, so the cycle future -> callback -> watch -> future would keep every
    request's watch, protocol and scope alive, and the growing heap made each full
    collection longer (a p99 of 200 ms and more on wsgi-granian).
    """

    __slots__ = ("receive", "gone", "waiting")

    def __init__(self, receive: Receive, gone: threading.Event) -> None:
        self.receive, self.gone = receive, gone
        self.waiting = self._next()

    def _next(self) -> asyncio.Future[Message]:
        waiting: Any = self.receive()
        if not asyncio.isfuture(waiting):
            waiting = asyncio.ensure_future(waiting)
        waiting.add_done_callback(self._done)
        return cast("asyncio.Future[Message]", waiting)

    def _done(self, waiting: asyncio.Future[Message]) -> None:
        waiting.remove_done_callback(self._done)
        if waiting.cancelled() or waiting.exception() is not None:
            return  # the watch was ended, or the server's receive() failed
        if waiting.result()["type"] == "http.disconnect":
            self.gone.set()
            return
        self.waiting = self._next()

    def cancel(self) -> None:
        waiting = self.waiting
        waiting.remove_done_callback(self._done)
        waiting.cancel()


class _Pool:
    """Up to `size` threads running jobs, started as needed and kept (a2wsgi's
    ThreadPoolExecutor without its futures: a job reports its end itself).

    A job goes to a queue; the counts say whether a thread is promised to it
    (one idle, or a new one) or it waits for the next thread to finish a job.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.jobs: queue.SimpleQueue[tuple[Any, tuple[Any, ...]]] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.threads = 0
        self.idle = 0  # threads waiting for a job no thread is promised to
        self.backlog = 0  # jobs queued with no thread promised to them

    def submit(self, job: Any, *args: Any) -> None:
        """Run `job(*args)` in a thread; it must not raise."""
        with self.lock:
            if self.idle:
                self.idle -= 1
                new = False
            elif self.threads < self.size:
                self.threads += 1
                new = True
            else:
                self.backlog += 1
                new = False
        self.jobs.put((job, args))
        if new:
            # Daemons: an exiting process does not wait for an abandoned request's thread.
            threading.Thread(target=self._work, name=f"WSGI_{self.threads - 1}",
                             daemon=True).start()

    def _work(self) -> None:
        jobs, lock = self.jobs, self.lock
        while True:
            job, args = jobs.get()
            try:
                job(*args)
            except BaseException:  # a job's own failure is its to report
                log.exception("the WSGI bridge's job failed")
            del job, args
            with lock:
                if self.backlog:
                    self.backlog -= 1
                else:
                    self.idle += 1


# The most body bytes the WSGI thread gets ahead of the client (a2wsgi: 10 messages).
SEND_WINDOW = 1 << 20
_END = None  # what the thread posts last, after the response or its failure


class _Responder:
    """a2wsgi's responder (WSGIResponder), with the WSGI thread's messages posted to the
    loop, not waited for one by one: the thread appends to `_posted` and wakes the
    loop when it sleeps (`_waiter`); it waits only while more than SEND_WINDOW body
    bytes are unsent. The loop sends them in order, each as it was posted, and calls
    `started` before it sends the head. The thread's last message is `_END`, its
    failure (`error`) set before it. Once the loop gives up (the send failed, the
    request was cancelled) the thread's next send raises ClientDisconnected, so its
    iteration stops and the response is closed."""

    def __init__(self, app: WSGIApp, started: Any) -> None:
        self.app = app
        self.started = started
        self.loop = asyncio.get_running_loop()
        self.response_started = False
        self.exc_info: Any = None
        self.error: BaseException | None = None  # the thread's failure
        self._posted: list[Message | None] = []
        self._lock = threading.Lock()
        self._room: threading.Condition | None = None  # made when the thread first waits
        self._unsent = 0  # body bytes posted and not yet sent
        self._waiter: asyncio.Future[None] | None = None  # the loop sleeps on it
        self._stopped = False
        self._over = False  # the loop has the thread's _END
        self._sized = False  # the head has a Content-Length

    async def __call__(self, pool: _Pool, environ: Environ, send: Send) -> None:
        pool.submit(contextvars.copy_context().run, self.wsgi, environ)
        try:
            await self._relay(send)
        except asyncio.CancelledError:
            self._stop()  # the thread ends at its next send
            raise
        except BaseException:
            # As a2wsgi: the send's failure is raised once the thread is over.
            self._stop()
            while not self._over:
                await self._batch()
            raise
        if self.error is not None:
            raise self.error
        if self.exc_info is not None:
            raise self.exc_info[0].with_traceback(self.exc_info[1], self.exc_info[2])

    async def _batch(self) -> list[Message | None]:
        """What the thread posted since the last batch, waiting for something."""
        while True:
            with self._lock:
                batch = self._posted
                if batch:
                    self._posted = []
                    self._over = batch[-1] is _END  # nothing is posted after it
                    return batch
                waiter = self._waiter = self.loop.create_future()
            await waiter

    async def _relay(self, send: Send) -> None:
        """Send what the thread posts, in order, until its end."""
        started = False
        while True:
            sent = 0
            for message in await self._batch():
                if message is _END:
                    return
                if not started and message["type"] == "http.response.start":
                    started = True
                    self.started()
                await send(message)
                sent += len(message.get("body", b""))
            if sent:
                with self._lock:
                    self._unsent -= sent
                    if self._room is not None:
                        self._room.notify()

    def _post(self, message: Message | None) -> None:
        with self._lock:
            if self._stopped and message is not _END:
                raise ClientDisconnected("the client went away")
            self._posted.append(message)
            waiter, self._waiter = self._waiter, None
            if message is not None:
                self._unsent += len(message.get("body", b""))
        if waiter is not None:
            self._wake(waiter)
        if self._unsent > SEND_WINDOW:
            with self._lock:
                if self._room is None:
                    self._room = threading.Condition(self._lock)
                while self._unsent > SEND_WINDOW and not self._stopped:
                    self._room.wait()

    def _post_end(self, complete: bool) -> None:
        """Post the thread's end, after the response's own end when it is `complete`
        (one wake-up of the loop for both; none of it once the exchange stopped)."""
        with self._lock:
            posted = self._posted
            if complete and not self._stopped:
                last = posted[-1] if posted else None
                if (self._sized and last is not None and last["type"] == "http.response.body"
                        and last["more_body"]):
                    # The last piece, not taken by the loop yet, ends the response (one
                    # send less) when the head has a Content-Length. Otherwise not:
                    # granian frames a body sent without a length in one message with
                    # Content-Length, unlike the ASGI face on granian (and the filter
                    # chain's rule that a changed body goes chunked).
                    last["more_body"] = False
                else:
                    posted.append({"type": "http.response.body", "body": b""})
            posted.append(_END)
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            self._wake(waiter)

    def _wake(self, waiter: asyncio.Future[None]) -> None:
        try:
            self.loop.call_soon_threadsafe(_wake, waiter)
        except RuntimeError:  # the loop is closed: nobody to send to
            self._stopped = True

    def _stop(self) -> None:
        with self._lock:
            self._stopped = True
            if self._room is not None:
                self._room.notify()

    def start_response(self, status: str, headers: list[tuple[str, str]],
                       exc_info: Any = None) -> Any:
        """a2wsgi's: the head is posted at once; `exc_info` is raised at the end."""
        self.exc_info = exc_info
        if not self.response_started:
            self.response_started = True
            self._post_head(int(status.split(" ", 1)[0]),
                            [(name.strip().encode("latin-1").lower(),
                              value.strip().encode("latin-1")) for name, value in headers])
        return lambda chunk: self._post(
            {"type": "http.response.body", "body": chunk, "more_body": True})

    def start_response_bytes(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """start_response for dualproxy's own face (wsgi.py), when the bridge's is the one
        it was given: the core's status code and byte headers, spared the round trip
        through str (and HTTPStatus's reason phrase); the same head as start_response's."""
        self.exc_info = None
        if not self.response_started:
            self.response_started = True
            names, ends = _HEADER_NAMES, _STRIPPED
            self._post_head(status, [(names.get(name) or _header_name(name),
                                      value if not value or (value[0] not in ends
                                                             and value[-1] not in ends)
                                      else _stripped(value)) for name, value in headers])

    def _post_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self._sized = b"content-length" in [name for name, _ in headers]
        self._post({"type": "http.response.start", "status": status, "headers": headers})

    def wsgi(self, environ: Environ) -> None:
        """The WSGI app's exchange (in a pool thread)."""
        complete = False
        try:
            iterable = self.app(environ, cast(StartResponse, self.start_response))
            try:
                for chunk in iterable:
                    self._post({"type": "http.response.body", "body": chunk, "more_body": True})
                complete = True
            finally:
                getattr(iterable, "close", lambda: None)()
        except BaseException as exc:
            self.error = exc
        finally:
            # The response's end goes with the thread's, once the iterable is closed.
            self._post_end(complete)


# A response header's name as start_response makes it (b"Content-Type": b"content-type"),
# for the names seen so far; bounded, as upstreams choose the names.
_HEADER_NAMES: dict[bytes, bytes] = {}
_HEADER_NAMES_MAX = 1024
# What str.strip() takes off a latin-1 text's ends: ASCII whitespace, \x1c-\x1f, NEL, NBSP.
_STRIPPED = frozenset(b"\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0")


def _header_name(name: bytes) -> bytes:
    """start_response's form of a header name: stripped and lower-cased as text."""
    lowered = name.decode("latin-1").strip().encode("latin-1").lower()
    if len(_HEADER_NAMES) < _HEADER_NAMES_MAX:
        _HEADER_NAMES[name] = lowered
    return lowered


def _stripped(value: bytes) -> bytes:
    """start_response's form of a header value (`value.strip()` as latin-1 text)."""
    if value and (value[0] in _STRIPPED or value[-1] in _STRIPPED):
        return value.decode("latin-1").strip().encode("latin-1")
    return value


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():  # not cancelled with the request
        waiter.set_result(None)


# How far the bridge reads a request body ahead of the WSGI thread's reads.
READ_WINDOW = 1 << 20


class _ReadAhead:
    """A request body received on the loop ahead of the WSGI thread's reads.

    a2wsgi's body took each ASGI message with a round trip from the thread to
    the loop. Here the thread's first read starts a reader on the loop, which
    receives messages (through the bridge's `guarded_receive`: its client
    timeout, its cut, its watch from the end of the body on) into a buffer up
    to READ_WINDOW bytes ahead; the thread takes what is there and waits only
    when nothing is. A body nobody reads is never read. Once the response
    starts the reader, if it runs, only watches for the client's disconnect
    (`watch`), as the bridge's watcher would.
    """

    def __init__(self, guarded: Receive, receive: Receive, gone: threading.Event,
                 watched: Any) -> None:
        self.loop = asyncio.get_running_loop()
        self.guarded, self.receive, self.gone, self.watched = guarded, receive, gone, watched
        self.cond = threading.Condition(threading.Lock())
        self.pieces: deque[bytes] = deque()
        self.size = 0  # bytes in `pieces`
        self.ended = False
        self.error: BaseException | None = None
        self.started = False
        self.task: asyncio.Task[None] | None = None
        self.watching = False
        self.full = False  # the reader waits for `room`
        self.room = asyncio.Event()

    # -- the WSGI thread --

    def take(self, size: int) -> bytes:
        """Up to `size` bytes, waiting for some; b"" at the end; the reader's error."""
        with self.cond:
            if not self.started:
                self.started = True
                self.loop.call_soon_threadsafe(self._start)
            while not self.pieces and not self.ended and self.error is None:
                self.cond.wait()
            pieces = self.pieces
            if not pieces:
                if self.error is not None:
                    raise self.error
                return b""
            data = pieces.popleft()
            if len(data) > size:
                pieces.appendleft(data[size:])
                data = data[:size]
            elif pieces and len(data) + len(pieces[0]) <= size:
                taken, length = [data], len(data)
                while pieces and length + len(pieces[0]) <= size:
                    taken.append(pieces.popleft())
                    length += len(taken[-1])
                data = b"".join(taken)
            self.size -= len(data)
            wake = self.full and self.size <= READ_WINDOW // 2
            if wake:
                self.full = False
        if wake:
            self.loop.call_soon_threadsafe(self.room.set)
        return data

    # -- the loop --

    def _start(self) -> None:
        if self.watched():
            # The response started before the first read (the WSGI face never does
            # that): the body is over for the app, as `guarded_receive` says then.
            with self.cond:
                if self.gone.is_set():
                    self.error = ClientDisconnected("client went away")
                self.ended = True
                self.cond.notify()
            return
        self.task = self.loop.create_task(self._run())

    async def _run(self) -> None:
        while not self.watching:
            if self.full:
                await self.room.wait()
                self.room.clear()
                continue
            try:
                message = await self.guarded()
            except Exception as exc:  # the client left, stalled, or the drain cut it
                with self.cond:
                    self.error = exc
                    self.cond.notify()
                return
            data = message.get("body", b"")
            more = message.get("more_body", False)
            with self.cond:
                if data:
                    self.pieces.append(data)
                    self.size += len(data)
                    self.full = self.size > READ_WINDOW
                if not more:
                    self.ended = True
                self.cond.notify()
            if not more:
                return  # `guarded_receive` started the bridge's watcher
        # The response started: watch, as the bridge's watcher does.
        await watch_disconnect(self.receive, self.gone)

    def watch(self) -> asyncio.Task[None] | None:
        """Make the running reader the bridge's watcher (the response starts): it
        reads no more body for the app, only waits for a disconnect. None: no reader runs."""
        task = self.task
        if task is None or task.done():
            return None
        self.watching = True
        self.room.set()
        return task

    def stop(self) -> None:
        """The exchange is over: the reader stops; a thread still reading is told."""
        if self.task is not None:
            self.task.cancel()
        with self.cond:
            if self.error is None and not self.ended:
                self.error = ClientDisconnected("the exchange ended")
            self.cond.notify()


class _BridgeBody(Body):
    """a2wsgi's request body (`wsgi.input`), fed by the bridge's read-ahead."""

    def __init__(self, source: _ReadAhead | None) -> None:
        self.buffer = bytearray()
        self.source = source
        self._has_more = source is not None

    def take(self, size: int) -> bytes:
        """Up to `size` received bytes past the buffer, waiting for some; b"" at the end."""
        if self.source is None or not self._has_more:
            return b""
        data = self.source.take(size)
        self._has_more = bool(data)
        return data

    def _receive_more_data(self) -> bytes:
        return self.take(READ_WINDOW)


class _DirectBody:
    """The bridge's request body read as it arrives (body_input.BodyInput): each
    `read` returns what was received, at most `size` bytes; it never waits to
    gather `size` bytes as `wsgi.input.read` does."""

    __slots__ = ("body",)
    direct_read = READ_WINDOW

    def __init__(self, body: _BridgeBody) -> None:
        self.body = body

    def read(self, size: int) -> bytes:
        body = self.body
        buffer = body.buffer
        if not buffer:
            return body.take(size)
        data = bytes(buffer[:size])
        del buffer[:size]
        return data


class _BridgeSource:
    """The bridge's offer to the WSGI face (body_input.BodySource)."""

    @staticmethod
    def recognise(stream: Any) -> _DirectBody | None:
        return _DirectBody(stream) if type(stream) is _BridgeBody else None

    @staticmethod
    def client_left(exc: BaseException) -> bool:
        return False  # the bridge raises ClientDisconnected itself


body_input.register(_BridgeSource())
