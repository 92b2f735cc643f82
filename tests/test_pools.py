"""One pool per upstream set (pools.py): routes naming the same upstreams share one.

Behaviour, on every pairing: one `--config` process whose routes name the same
upstreams share the upstream marks (a dead upstream one route found is skipped by
the others) and the connections (the recording upstream's connection ids), while
a route differing in one pool setting shares neither. Unit: the registry's key,
the router's sharing, the life cycle (made once, closed once by the last route),
the prober (one), a user's client (never shared) and the pool gauge (one series).
"""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from dualproxy import AsyncProxy, AsyncRouter, ProxyConfig, SyncProxy, SyncRouter
from dualproxy.pools import PoolKey, Pools
from tests.conftest import ProxyPool, ProxyProcess, free_port
from tests.rawhttp import exchange, request_bytes
from tests.upstream import Upstream

# -- on every pairing ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens: connect refused


@pytest.fixture(scope="module")
def shared_file(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream,
                dead_url: str) -> Path:
    """/a and /b share a pool of [dead, live] (and /c differs in max_connections);
    /d and /e share one of [live] (and /f differs in max_connections); /g and /h one
    of [live, dead] with health checks. One worker: a pool is shared in a process."""
    live = upstream.url
    pair = f'upstream = ["{dead_url}", "{live}"]\nretries = 0\nfail_timeout = 60'
    probed = f'upstream = ["{live}", "{dead_url}"]\nhealth_path = "/probe"\nhealth_interval = 0.5'
    routes = {
        "/a": pair,
        "/b": pair + "\ntimeout = 7",  # per request: no part of the pool's key
        "/c": pair + "\nmax_connections = 50",
        "/d": f'upstream = "{live}"',
        "/e": f'upstream = "{live}"',
        "/f": f'upstream = "{live}"\nmax_connections = 50',
        "/g": probed,
        "/h": probed,
    }
    path = tmp_path_factory.mktemp("pools") / "shared.toml"
    path.write_text("workers = 1\n" + "".join(f'\n[[route]]\nmount = "{mount}"\n{keys}\n'
                                              for mount, keys in routes.items()))
    return path


@pytest.fixture
def shared(pairing: str, proxy_pool: ProxyPool, shared_file: Path) -> ProxyProcess:
    return proxy_pool.get(pairing, "", ("--config", str(shared_file)))


def get(proxy: ProxyProcess, target: str, rid: str) -> int:
    return exchange(proxy.port, request_bytes("GET", target, [("x-req-id", rid)])).status


def test_an_upstream_one_route_marks_down_is_down_for_every_route_sharing_its_pool(
        shared: ProxyProcess, upstream: Upstream, rid: str) -> None:
    # /a's first request goes to the first upstream (the dead one): no retry, 502,
    # and the dead one is marked down for 60 s.
    assert get(shared, f"/a/{rid}-a", f"{rid}-a") == 502
    for i in range(3):  # /b never tries it: every request reaches the live one
        assert get(shared, f"/b/{rid}-{i}", f"{rid}-{i}") == 200, shared.log()[-2000:]
        assert upstream.wait_record(f"{rid}-{i}").target == f"/{rid}-{i}".encode()
    # /c differs in a pool setting: a pool of its own, which has not seen the dead one.
    assert get(shared, f"/c/{rid}-c", f"{rid}-c") == 502


def test_routes_sharing_a_pool_share_its_connections(shared: ProxyProcess, upstream: Upstream,
                                                     rid: str) -> None:
    ids = {}
    for mount in ("d", "e", "f"):
        assert get(shared, f"/{mount}/{rid}-{mount}", f"{rid}-{mount}") == 200
        ids[mount] = upstream.wait_record(f"{rid}-{mount}").conn_id
    assert ids["e"] == ids["d"], "/e opened a connection of its own: no shared pool"
    assert ids["f"] != ids["d"], "/f's pool settings differ: it must not share"


def test_routes_sharing_a_pool_share_its_prober(shared: ProxyProcess, dead_url: str,
                                               rid: str) -> None:
    """One prober finds the dead upstream down: one WARNING line, not one a route."""
    down = f"upstream {dead_url} is down (health check"

    def lines() -> int:
        return shared.log().count(down)

    # The wsgi face starts its client, and the prober with it, at the first request.
    assert get(shared, f"/g/{rid}-g", f"{rid}-g") == 200
    deadline = time.monotonic() + 10
    while not lines() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lines() == 1, shared.log()[-2000:]
    for i in range(2):  # /h skips it (the prober's mark) and starts no prober of its own
        assert get(shared, f"/h/{rid}-{i}", f"{rid}-{i}") == 200
    time.sleep(1.5)  # three intervals: a second prober would have said so
    assert lines() == 1, shared.log()[-2000:]
    retried = [line for line in shared.log().splitlines()
               if f"/h/{rid}" in line and "retrying" in line]
    assert not retried, retried


# -- the registry, in process ------------------------------------------------------------

A, B = "http://127.0.0.1:9101", "http://127.0.0.1:9102"


def config(upstream: str | list[str] = A, **options: Any) -> ProxyConfig:
    return ProxyConfig.build(upstream, **options)


@pytest.mark.parametrize("other", [
    {"mount": "/elsewhere"}, {"timeout": 3}, {"retries": 0}, {"pool_timeout": 1},
    {"add_request_headers": {"x-route": "b"}},
    {"upstream": [B, A], "max_fails": 2}, {"upstream": [A, B], "max_fails": 2},
])
def test_the_same_upstreams_and_pool_settings_share(other: dict[str, Any]) -> None:
    first = config([A, B] if "upstream" in other else A, max_fails=other.get("max_fails", 1))
    second = config(**{"upstream": A, **other})
    pools = Pools()
    assert PoolKey.of(first) == PoolKey.of(second)
    assert pools.pool(first, "sync") is pools.pool(second, "sync")
    # The other kind of face makes its own client, over the same balancer.
    assert pools.pool(second, "async") is not pools.pool(first, "sync")
    assert pools.pool(second, "async").balancer is pools.pool(first, "sync").balancer


@pytest.mark.parametrize("other", [
    {"upstream": B}, {"upstream": A + "/base"}, {"upstream": [A, B]},
    {"max_connections": 5}, {"max_keepalive_connections": 5}, {"verify": False},
    {"balance": "round-robin"}, {"max_fails": 3}, {"fail_timeout": 3},
    {"health_path": "/h"}, {"health_path": "/h", "health_interval": 1},
])
def test_routes_differing_in_a_pool_setting_share_nothing(other: dict[str, Any]) -> None:
    pools = Pools()
    first = pools.pool(config(), "sync")
    second = pools.pool(config(**other), "sync")
    assert second is not first and second.balancer is not first.balancer
    assert len(pools) == 2


def test_only_a_router_shares() -> None:
    standalone = [AsyncProxy(A), AsyncProxy(A)]  # no router: each keeps its own, as ever
    assert standalone[0].pool is not standalone[1].pool
    routes = [AsyncProxy(A, mount="/x"), AsyncProxy(A, mount="/y", timeout=2),
              AsyncProxy(A, mount="/z", max_connections=9)]
    router = AsyncRouter(routes)
    assert routes[0].pool is routes[1].pool and routes[0].balancer is routes[1].balancer
    assert routes[2].pool is not routes[0].pool
    assert all(route.pools is router.pools for route in routes)


def test_a_wsgi_router_and_its_websocket_twin_share_the_balancer() -> None:
    routes = [SyncProxy(A, mount="/x"), SyncProxy(A, mount="/y")]
    router = SyncRouter(routes)
    twins = router.asgi_twin().proxies
    assert twins[0].pool is twins[1].pool is not routes[0].pool
    assert twins[0].balancer is routes[0].balancer is routes[1].balancer
    lone = SyncProxy(A)
    from dualproxy.router import async_twin

    assert async_twin(lone).balancer is lone.balancer


def test_a_user_client_is_never_shared_nor_closed(upstream: Upstream) -> None:
    own = httpx.Client(trust_env=False)
    routes = [SyncProxy(upstream.url, mount="/x", client=own), SyncProxy(upstream.url)]
    router = SyncRouter(routes)
    assert routes[0].pool is not routes[1].pool
    assert routes[0].client is own and routes[1].client is not own
    router.close()
    assert not own.is_closed and routes[0].client is own
    own.close()


def test_the_last_route_closes_the_shared_client_and_prober_once(upstream: Upstream) -> None:
    routes = [SyncProxy(upstream.url, mount="/x", health_path="/h", health_interval=30),
              SyncProxy(upstream.url, mount="/y", health_path="/h", health_interval=30)]
    SyncRouter(routes)
    client = routes[0].client
    prober = routes[0]._health
    assert prober is not None and routes[0].balancer.prober is prober
    assert routes[1].client is client and routes[1]._health is prober  # made once
    routes[0].close()
    assert not client.is_closed and not prober._stop.is_set()  # /y holds it still
    routes[0].close()  # twice from one route: still not the last one
    assert not client.is_closed
    routes[1].close()
    assert client.is_closed and prober._stop.is_set()
    assert routes[0].balancer.prober is None
    again = routes[1].client  # the next request makes another, and a prober with it
    assert again is not client and routes[1]._health is not None
    routes[1].close()
    assert again.is_closed


def test_an_async_router_lifespan_opens_and_closes_a_shared_pool_once(
        upstream: Upstream) -> None:
    routes = [AsyncProxy(upstream.url, mount="/x"), AsyncProxy(upstream.url, mount="/y")]
    router = AsyncRouter(routes)
    made: list[httpx.AsyncClient] = []
    pool = routes[0].pool
    make = routes[0]._new_client

    def counted() -> Any:
        made.append((pair := make())[0])
        return pair

    routes[0]._new_client = routes[1]._new_client = counted  # type: ignore[method-assign]

    async def lifespan() -> None:
        inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        replies: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            replies.append(message)

        inbox.put_nowait({"type": "lifespan.startup"})
        task = asyncio.ensure_future(router({"type": "lifespan"}, inbox.get, send))
        while not replies:
            await asyncio.sleep(0.01)
        assert replies == [{"type": "lifespan.startup.complete"}]
        assert len(made) == 1 and pool.holders() == 2
        inbox.put_nowait({"type": "lifespan.shutdown"})
        await task
        assert replies[-1] == {"type": "lifespan.shutdown.complete"}

    asyncio.run(lifespan())
    assert len(made) == 1 and made[0].is_closed and pool.holders() == 0


def test_the_pool_gauge_counts_each_pool_once(upstream: Upstream, rid: str) -> None:
    """The upstream's one gauge, whichever route watched it last: the requests in flight
    of /x (whose pool /y shares: counted once) and of /z (a pool of its own)."""
    registry = CollectorRegistry()
    routes = [SyncProxy(upstream.url, mount=mount, metrics=registry, max_connections=size)
              for mount, size in (("/x", 100), ("/y", 100), ("/z", 9))]
    router = SyncRouter(routes)
    label = {"upstream": str(routes[0].config.upstreams[0])}

    def in_use() -> float | None:
        return registry.get_sample_value("dualproxy_pool_connections_in_use", label)

    def start(mount: str) -> Any:  # the head is in, the body not read: in flight
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": f"{mount}/{rid}",
                   "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.url_scheme": "http",
                   "wsgi.input": io.BytesIO(), "REMOTE_ADDR": "127.0.0.1", "HTTP_HOST": "app",
                   "HTTP_X_UPSTREAM": "download size=100000"}
        return router(environ, lambda status, headers, exc_info=None: lambda data: None)

    bodies = [start("/x")]
    try:
        assert in_use() == 1
        bodies.append(start("/z"))
        assert in_use() == 2
    finally:
        for body in bodies:
            body.close()
    assert in_use() == 0
    router.close()
