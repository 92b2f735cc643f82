"""unix:/path.sock[:/base] upstreams, on every pairing: bodies hashed both ways, Host
`localhost`, a base path, keep-alive, a missing socket, WebSocket; and the pools of
both transports keeping two sockets' connections apart.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from collections.abc import Iterator

import httpx
import pytest
from websockets.sync.client import connect

from dualproxy.config import ProxyConfig
from dualproxy.core import IncomingRequest, build_request, plan_request
from dualproxy.face import make_async_client, make_sync_client
from tests.conftest import MakeProxy, assert_reused, transfer_hashed
from tests.upstream import Upstream
from tests.ws_upstream import WsUpstream

pytestmark = pytest.mark.pairings

MiB = 1 << 20


def test_20mb_both_ways_hashed(make_proxy: MakeProxy, unix_upstream: Upstream) -> None:
    proxy = make_proxy(upstream_url=unix_upstream.url)
    transfer_hashed(proxy, unix_upstream, 20 * MiB)


def test_host_is_localhost_and_base_path(make_proxy: MakeProxy, unix_upstream: Upstream,
                                         rid: str) -> None:
    proxy = make_proxy("--mount", "/api", upstream_url=unix_upstream.url + ":/base")
    with proxy.client() as client:
        resp = client.get("/api/x/y?z=1", headers={"x-req-id": rid})
    assert resp.status_code == 200, resp.text
    rec = unix_upstream.wait_record(rid)
    assert rec.target == b"/base/x/y?z=1"
    assert rec.header_all("host") == ["localhost"]


def test_preserve_host_sends_the_clients(make_proxy: MakeProxy, unix_upstream: Upstream,
                                         rid: str) -> None:
    proxy = make_proxy("--preserve-host", upstream_url=unix_upstream.url)
    with proxy.client() as client:
        resp = client.get("/x", headers={"x-req-id": rid, "host": "app.example"})
    assert resp.status_code == 200, resp.text
    assert unix_upstream.wait_record(rid).header_all("host") == ["app.example"]


def test_unix_connections_are_reused(make_proxy: MakeProxy, unix_upstream: Upstream) -> None:
    proxy = make_proxy(upstream_url=unix_upstream.url)
    assert_reused(proxy, unix_upstream)


def test_missing_socket_is_a_502_problem(make_proxy: MakeProxy) -> None:
    missing = os.path.join(tempfile.gettempdir(), "dualproxy-no-such.sock")
    proxy = make_proxy(upstream_url=f"unix:{missing}")
    with proxy.client() as client:
        resp = client.get("/x")
    assert resp.status_code == 502
    assert resp.headers["content-type"] == "application/problem+json"
    assert json.loads(resp.text)["detail"] == "the upstream refused or could not be reached"
    assert "Traceback" not in proxy.log()


@pytest.fixture(scope="session")
def ws_unix_upstream(socket_dir: str) -> Iterator[WsUpstream]:
    server = WsUpstream(unix=os.path.join(socket_dir, "ws.sock")).start()
    yield server
    server.stop()


def test_websocket_to_a_unix_upstream(make_proxy: MakeProxy, ws_unix_upstream: WsUpstream,
                                      rid: str) -> None:
    proxy = make_proxy(upstream_url=ws_unix_upstream.url)
    with connect(f"ws://127.0.0.1:{proxy.port}/echo", additional_headers={"x-req-id": rid},
                 open_timeout=10, close_timeout=5) as ws:
        for message in ("over a unix socket", b"\xff" * 100_000):
            ws.send(message)
            assert ws.recv(timeout=5) == message
    record = ws_unix_upstream.record(rid)
    assert record.target == "/echo" and record.header("host") == ["localhost"]


# ------------------------------------------------------------------ the pool key


@pytest.fixture
def two_sockets(socket_dir: str) -> Iterator[tuple[Upstream, Upstream]]:
    with Upstream(unix=os.path.join(socket_dir, "a.sock")) as a, \
            Upstream(unix=os.path.join(socket_dir, "b.sock")) as b:
        yield a, b


def _requests(config: ProxyConfig) -> list[httpx.Request]:
    """Alternating requests to each upstream of `config`, as the core builds them."""
    incoming = IncomingRequest(method="GET", target=b"/x", headers=[(b"host", b"h")],
                               peer="127.0.0.1")
    plan = plan_request(config, incoming)
    return [build_request(config, plan, None, upstream)
            for _ in range(3) for upstream in config.upstreams]


def test_sync_pool_keeps_sockets_apart(two_sockets: tuple[Upstream, Upstream]) -> None:
    a, b = two_sockets
    config = ProxyConfig(upstream=[a.url, b.url])
    client, transport = make_sync_client(config)
    with client:
        for request in _requests(config):
            response = transport.handle_request(request)
            response.read()
            assert response.status_code == 200
    assert (len(a.records), len(b.records)) == (3, 3)
    assert (a.total_connections(), b.total_connections()) == (1, 1)


def test_async_pool_keeps_sockets_apart(two_sockets: tuple[Upstream, Upstream]) -> None:
    a, b = two_sockets
    config = ProxyConfig(upstream=[a.url, b.url])

    async def run() -> None:
        client, transport = make_async_client(config)
        async with client:
            for request in _requests(config):
                response = await transport.handle_async_request(request)
                await response.aread()
                assert response.status_code == 200

    asyncio.run(run())
    assert (len(a.records), len(b.records)) == (3, 3)
    assert (a.total_connections(), b.total_connections()) == (1, 1)
