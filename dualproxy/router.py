"""Several routes in one app: `AsyncRouter` over AsyncProxy instances, `SyncRouter`
over SyncProxy instances.

Thin on purpose: the route is the core's decision (routes.RouteTable, the longest
mount), everything else is the chosen proxy's: timeouts, limits, access-log route
name. The routes' pools come from one registry per router (pools.py): routes
naming the same upstreams with the same pool settings share one client, balancer
and prober. A request no mount covers goes to the first proxy, whose own mount
check answers the 404 problem (or calls its `fallback`): the outside-the-mount
answer stays written once, for HTTP and WebSocket alike.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

from .asgi import AsyncProxy
from .pools import Pools
from .routes import RouteTable
from .types import Environ, Message, Receive, Scope, Send, StartResponse
from .wsgi import SyncProxy, _environ_target

ProxyT = TypeVar("ProxyT", AsyncProxy, SyncProxy)


class _Router(Generic[ProxyT]):
    def __init__(self, proxies: Sequence[ProxyT], *, pools: Pools | None = None) -> None:
        self.proxies: tuple[ProxyT, ...] = tuple(proxies)
        self.table = RouteTable([proxy.config.mount for proxy in self.proxies],
                                max((proxy.config.max_target_bytes for proxy in self.proxies),
                                    default=None))
        # One registry for the routes (or the one given: a WSGI router's, for its twin).
        self.pools = Pools() if pools is None else pools
        for proxy in self.proxies:  # each plan applies the routing rule to every mount
            proxy.routes = self.table.mounts
            proxy.share(self.pools)

    def route(self, target: bytes) -> ProxyT:
        """The proxy whose mount is the longest covering `target` (else the first)."""
        index = self.table.match(target)
        return self.proxies[0 if index is None else index]


class AsyncRouter(_Router[AsyncProxy]):
    """ASGI app routing to AsyncProxy instances by their mounts, the longest first.

    `AsyncRouter([AsyncProxy(api_url, mount="/api"), AsyncProxy(files_url, mount="/files")])`.
    Lifespan events go to every proxy (each takes its pool's client and lets it go;
    a pool's client is closed once, by the last route holding it).
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        raw: bytes = scope.get("raw_path") or scope.get("path", "/").encode("utf-8")
        await self.route(raw)(scope, receive, send)

    async def aclose(self) -> None:
        """Close the clients the proxies' pools created."""
        for proxy in self.proxies:
            await proxy.aclose()

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Forward each lifespan event to every proxy; answer once all have, the first
        failure winning."""
        inboxes: list[asyncio.Queue[Message]] = [asyncio.Queue() for _ in self.proxies]
        replies: asyncio.Queue[Message] = asyncio.Queue()
        phase = "lifespan.startup"

        async def run(proxy: AsyncProxy, inbox: asyncio.Queue[Message]) -> None:
            try:
                await proxy(scope, inbox.get, replies.put)
            except Exception as exc:  # answered as the server would report it
                await replies.put({"type": f"{phase}.failed", "message": repr(exc)})

        tasks = [asyncio.ensure_future(run(proxy, inbox))
                 for proxy, inbox in zip(self.proxies, inboxes, strict=True)]
        try:
            while True:
                message = await receive()
                phase = message["type"]
                for inbox in inboxes:
                    inbox.put_nowait(message)
                answers = [await replies.get() for _ in tasks]
                failed = [a for a in answers if a["type"].endswith(".failed")]
                await send(failed[0] if failed else answers[0])
                if failed or phase == "lifespan.shutdown":
                    return
        finally:
            for task in tasks:
                task.cancel()


class SyncRouter(_Router[SyncProxy]):
    """WSGI app routing to SyncProxy instances by their mounts, the longest first.

    `SyncRouter([SyncProxy(api_url, mount="/api"), SyncProxy(files_url, mount="/files")])`.
    """

    def __call__(self, environ: Environ, start_response: StartResponse) -> Any:
        return self.route(_environ_target(environ))(environ, start_response)

    def close(self) -> None:
        """Close the clients the proxies' pools created."""
        for proxy in self.proxies:
            proxy.close()

    def asgi_twin(self) -> AsyncRouter:
        """The same routes on the async face: WebSockets under an ASGI server (bridge.py)."""
        return AsyncRouter([async_twin(proxy) for proxy in self.proxies], pools=self.pools)


def async_twin(proxy: SyncProxy) -> AsyncProxy:
    """An AsyncProxy on the same config, access log settings and metrics as `proxy`,
    in its pool registry: one balancer (in-flight counts, health marks) and prober
    per upstream set and process."""
    twin = AsyncProxy(config=proxy.config, access_log=proxy._log.enabled,
                      access_log_format=proxy._log.format)
    twin.share(proxy.pools)
    if proxy.metrics is not None:  # after the balancer: the gauges read the shared one
        twin._start_metrics(proxy.metrics.registry)
    return twin
