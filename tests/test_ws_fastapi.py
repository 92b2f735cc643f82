"""WebSocket through the FastAPI glue (`app.mount`, `proxy_router` with a dependency)
and through an AsyncProxy's `fallback` (the app behind serves what is outside its mount).

Glue, not a pairing: the app runs under uvicorn, as its users run it.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.test_integrations import App, uvicorn
from tests.test_websocket import ws_upstream  # noqa: F401  (the session fixture)
from tests.ws_upstream import WsUpstream


@pytest.fixture(scope="module")
def glue(ws_upstream: WsUpstream) -> Iterator[App]:  # noqa: F811
    app = uvicorn("tests.ws_fastapi_app:outer", ws_upstream)  # type: ignore[arg-type]
    yield app
    app.stop()


def echo(app: App, target: str, rid: str, **headers: str) -> None:
    with connect(f"ws://127.0.0.1:{app.port}{target}", open_timeout=10,
                 additional_headers={"x-req-id": rid, **headers}) as ws:
        ws.send("through the glue")
        assert ws.recv(timeout=5) == "through the glue"


def test_mount_proxies_websockets(glue: App, ws_upstream: WsUpstream, rid: str) -> None:  # noqa: F811
    echo(glue, "/mnt/a%2Fb?x=1&y=", rid)
    assert ws_upstream.record(rid).target == "/base/a%2Fb?x=1&y="


def test_router_runs_dependencies_before_the_upgrade(glue: App, ws_upstream: WsUpstream,  # noqa: F811
                                                     rid: str) -> None:
    echo(glue, "/v1/r/a%2Fb?x=1", rid, authorization="Bearer t")
    assert ws_upstream.record(rid).target == "/routed/a%2Fb?x=1"
    with pytest.raises(InvalidStatus) as info:
        connect(f"ws://127.0.0.1:{glue.port}/v1/r/x", open_timeout=10,
                additional_headers={"x-req-id": rid + "-refused"})
    assert info.value.response.status_code == 401
    assert b"token required" in bytes(info.value.response.body)
    assert rid + "-refused" not in ws_upstream.records  # never reached the upstream
    assert httpx.get(f"{glue.url}/own", timeout=10).json() == {"served_by": "fastapi"}


def test_fallback_serves_websockets_outside_the_mount(glue: App, ws_upstream: WsUpstream,  # noqa: F811
                                                     rid: str) -> None:
    echo(glue, "/p/x?y", rid)
    assert ws_upstream.record(rid).target == "/outer/x?y"
    with connect(f"ws://127.0.0.1:{glue.port}/own-ws", open_timeout=10) as ws:
        assert ws.recv(timeout=5) == "served by fastapi"
