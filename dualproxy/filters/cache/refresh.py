"""Background refreshes (RFC 5861 stale-while-revalidate): the stale answer goes to
the client at once and the same request, made conditional, goes upstream behind it.

A refresh is sent through dualproxy's own HTTP/1.1 transport (http1/: the same
upstream URL handling, TLS and unix sockets as the faces' requests, a small pool
of its own), to the route's first upstream, and
its head is read as the faces read one (core.plan_response). One refresh per key
at a time; on the async face it is a task of the running loop, on the sync face a
daemon thread. A refresh that fails is logged and forgotten: the stale answer
stays until it is validated in the foreground.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx

from ...core import ResponseHead, UpstreamPlan, build_request, plan_response, response_header_list

if TYPE_CHECKING:
    from ...config import ProxyConfig

error_logger = logging.getLogger("dualproxy")

# What a refresh's response does to the store: an awaitable with an asyncio store.
Apply = Callable[[ResponseHead, bytes], Any]


class Refresher:
    """Starts background refreshes for one route's cache."""

    def __init__(self, config: ProxyConfig, max_body: int) -> None:
        self.config = config
        self.max_body = max_body
        self._busy: set[str] = set()
        self._lock = threading.Lock()
        self._sync: Any = None      # the transports, made on first use
        self._async: Any = None
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, key: str, plan: UpstreamPlan, apply: Apply) -> bool:
        """Refresh `key` with `plan` unless a refresh of it is under way already."""
        with self._lock:
            if key in self._busy:
                return False
            self._busy.add(key)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            threading.Thread(target=self._run_sync, args=(key, plan, apply), daemon=True,
                             name="dualproxy-cache-refresh").start()
        else:
            task = loop.create_task(self._run_async(key, plan, apply))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return True

    def _done(self, key: str) -> None:
        with self._lock:
            self._busy.discard(key)

    def _head(self, plan: UpstreamPlan, response: httpx.Response) -> ResponseHead:
        """The refreshed response's head, read as the faces read one."""
        return plan_response(self.config, plan, response.status_code,
                             response_header_list(response))

    def _run_sync(self, key: str, plan: UpstreamPlan, apply: Apply) -> None:
        try:
            if self._sync is None:
                from ...http1 import UpstreamTransport
                from ...http1.tls import upstream_context

                self._sync = UpstreamTransport(ssl_context=upstream_context(self.config))
            response = self._sync.handle_request(build_request(self.config, plan, None))
            try:
                head, body = self._head(plan, response), _Body(self.max_body)
                if head.has_body:
                    for chunk in response.stream:
                        if not body.add(chunk):
                            return
            finally:
                response.close()
            apply(head, body.content())
        except Exception as exc:  # a refresh is best effort: the next request validates
            error_logger.warning("cache: the background refresh of %s failed: %r", key, exc)
        finally:
            self._done(key)

    async def _run_async(self, key: str, plan: UpstreamPlan, apply: Apply) -> None:
        try:
            if self._async is None:
                from ...http1 import AsyncUpstreamTransport
                from ...http1.tls import upstream_context

                self._async = AsyncUpstreamTransport(ssl_context=upstream_context(self.config))
            response = await self._async.handle_async_request(
                build_request(self.config, plan, None))
            try:
                head, body = self._head(plan, response), _Body(self.max_body)
                if head.has_body:
                    async for chunk in response.stream:
                        if not body.add(chunk):
                            return
            finally:
                await response.aclose()
            applied = apply(head, body.content())
            if inspect.isawaitable(applied):
                await applied
        except Exception as exc:
            error_logger.warning("cache: the background refresh of %s failed: %r", key, exc)
        finally:
            self._done(key)


class _Body:
    """A refreshed body, collected up to the object limit."""

    __slots__ = ("limit", "parts", "size")

    def __init__(self, limit: int) -> None:
        self.limit, self.size = limit, 0
        self.parts: list[bytes] = []

    def add(self, chunk: bytes) -> bool:
        """Keep `chunk`; False when the body grew past the limit (it is not stored)."""
        self.size += len(chunk)
        self.parts.append(chunk)
        return self.size <= self.limit

    def content(self) -> bytes:
        return b"".join(self.parts)
