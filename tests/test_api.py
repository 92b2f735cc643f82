"""The Python API's promises: config validation, hooks on both faces, errors a hook raises,
and the WSGI face's pool slot when the server refuses a head.

Not pairing-parametrized: these are about what `SyncProxy`/`AsyncProxy` accept and do
when called directly. The faces forward to the suite's real recording upstream; the
in-process httpx transports are fine here because no test relies on streaming.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import httpx
import pytest

from dualproxy import AsyncProxy, ProxyConfig, SyncProxy
from dualproxy.core import ResponseHead, UpstreamPlan
from dualproxy.errors import ProxyError
from dualproxy.filters import Exchange, Filter
from tests.conftest import free_port
from tests.upstream import Upstream

# --- ProxyError statuses ------------------------------------------------------------------


@pytest.mark.parametrize(("status", "title"), [
    (499, "Client Error"), (420, "Client Error"), (599, "Server Error"),
    (418, "I'm a Teapot"), (451, "Unavailable For Legal Reasons"), (503, "Service Unavailable"),
])
def test_any_error_status_has_a_title_and_a_problem_body(status: int, title: str) -> None:
    exc = ProxyError("refused by a hook", status=status)
    assert exc.title == title
    assert json.loads(exc.body()) == {"type": "about:blank", "title": title, "status": status,
                                      "detail": "refused by a hook"}


@pytest.mark.parametrize("status", [200, 302, 399, 600, 99, True])
def test_error_status_outside_400_599_is_refused(status: int) -> None:
    with pytest.raises(ValueError, match="400-599"):
        ProxyError("x", status=status)


# --- header options are validated once ----------------------------------------------------


@pytest.mark.parametrize("option", [
    {"add_response_headers": {"x-bad": "a\r\nInjected: 1"}},
    {"add_response_headers": {"x-bad": "nul\x00"}},
    {"add_response_headers": [("bad name", "v")]},
    {"add_request_headers": {"x-bad": "line\nbreak"}},
    {"add_request_headers": {"x-snow": "\u2603"}},
    {"remove_request_headers": ["x:colon"]},
    {"remove_response_headers": ["with space"]},
    # the fields no header rule may add: framing (a second length upstream is smuggling)
    {"add_request_headers": {"Content-Length": "0"}},
    {"add_request_headers": {"Transfer-Encoding": "chunked"}},
    {"add_request_headers": {"Host": "second.example"}},
    {"add_response_headers": {"Content-Length": "0"}},
    {"add_response_headers": {"Connection": "close"}},
    {"add_response_headers": {"Server": "mine"}},
])
def test_invalid_header_options_fail_at_construction(option: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="header"):
        ProxyConfig.build("http://127.0.0.1:9", **option)


def test_valid_header_options_are_kept() -> None:
    config = ProxyConfig.build("http://127.0.0.1:9", add_response_headers={"X-Ok": "a b\tc"},
                               remove_request_headers=[" Cookie "])
    assert config.add_response_headers == ((b"x-ok", b"a b\tc"),)
    assert config.remove_request_headers == frozenset({b"cookie"})


# --- the WSGI face when start_response raises ---------------------------------------------


def _collect(proxy: SyncProxy, path: str) -> tuple[str, bytes]:
    seen: dict[str, str] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        seen["status"] = status
        return lambda data: None

    body = proxy({"REQUEST_METHOD": "GET", "RAW_URI": path, "SCRIPT_NAME": "",
                  "PATH_INFO": path, "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_HOST": "front",
                  "REMOTE_ADDR": "127.0.0.1", "wsgi.url_scheme": "http",
                  "wsgi.input": None}, start_response)
    try:
        data = b"".join(body)
    finally:
        getattr(body, "close", lambda: None)()
    return seen["status"], data


def test_a_refused_head_gives_the_pool_slot_back(upstream: Upstream) -> None:
    proxy = SyncProxy(upstream.url, max_connections=1, pool_timeout=1.0, access_log=False)

    def refusing(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        raise ValueError("the server refuses this head")

    try:
        for _ in range(3):
            with pytest.raises(ValueError, match="refuses"):
                proxy({"REQUEST_METHOD": "GET", "RAW_URI": "/x", "HTTP_HOST": "front",
                       "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.url_scheme": "http",
                       "wsgi.input": None}, refusing)
        status, _ = _collect(proxy, "/after")
        assert status == "200 OK"  # not 503: the one connection came back to the pool
    finally:
        proxy.close()


# --- hooks --------------------------------------------------------------------------------


def tag_request(plan: UpstreamPlan) -> UpstreamPlan:
    return UpstreamPlan(plan.method, plan.target, [*plan.headers, (b"x-hooked", b"sync")],
                        plan.content_length, plan.has_body, plan.mount, plan.incoming)


def tag_response(plan: UpstreamPlan, head: ResponseHead) -> ResponseHead:
    return ResponseHead(head.status, [*head.headers, (b"x-hooked", b"sync")], head.has_body)


async def async_tag_response(plan: UpstreamPlan, head: ResponseHead) -> ResponseHead:
    await asyncio.sleep(0)
    return ResponseHead(head.status, [*head.headers, (b"x-hooked", b"async")], head.has_body)


def refuse_499(plan: UpstreamPlan) -> None:
    raise ProxyError("the client gave up", status=499)


class AsyncCallable:
    async def __call__(self, plan: UpstreamPlan) -> None:
        return None


def _get_both(config: ProxyConfig, path: str) -> list[httpx.Response]:
    """The same GET through a SyncProxy and an AsyncProxy sharing `config`."""
    sync = SyncProxy(config=config, access_log=False)
    with httpx.Client(transport=httpx.WSGITransport(app=sync), base_url="http://front") as c:
        sync_response = c.get(path)
    sync.close()

    async def run() -> httpx.Response:
        proxy = AsyncProxy(config=config, access_log=False)
        transport = httpx.ASGITransport(app=proxy)
        async with httpx.AsyncClient(transport=transport, base_url="http://front") as client:
            response = await client.get(path)
        await proxy.aclose()
        return response

    return [sync_response, asyncio.run(run())]


def test_sync_hooks_in_a_shared_config_run_on_both_faces(upstream: Upstream, rid: str) -> None:
    config = ProxyConfig.build(upstream.url, request_hooks=[tag_request],
                               response_hooks=[tag_response])
    for response in _get_both(config, f"/hooked?{rid}"):
        assert response.status_code == 200
        assert response.headers.get_list("x-hooked") == ["sync"]
        assert response.json()["headers"].count(["x-hooked", "sync"]) == 1


class SeesRequestId(Filter):
    """A user filter (inside the built-in ones): exchange.request_id is set for it."""

    def on_response(self, exchange: Exchange, head: ResponseHead) -> None:
        head.headers.append((b"x-seen-id", (exchange.request_id or "none").encode()))


def test_builtin_filter_options_run_on_both_faces(upstream: Upstream, rid: str) -> None:
    config = ProxyConfig.build(upstream.url, mount="/api", request_id=True,
                               header_up=["X-Rid: {request_id}", "+X-Scheme: {scheme}"],
                               header_down=("+X-Down: {request_id}",),
                               filters=[SeesRequestId()])
    seen = set()
    for response in _get_both(config, f"/api/rules?{rid}"):
        assert response.status_code == 200
        request_id = response.headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", request_id)
        assert response.headers["x-down"] == response.headers["x-seen-id"] == request_id
        sent = response.json()["headers"]
        assert ["x-rid", request_id] in sent and ["x-request-id", request_id] in sent
        assert ["x-scheme", "http"] in sent and ["x-forwarded-prefix", "/api"] in sent
        seen.add(request_id)
    assert len(seen) == 2


@pytest.mark.parametrize("hooks", [
    {"response_hooks": [async_tag_response]},
    {"request_hooks": [AsyncCallable()]},
])
def test_async_hooks_are_refused_by_the_sync_face_at_construction(hooks: dict[str, Any]) -> None:
    config = ProxyConfig.build("http://127.0.0.1:9", **hooks)
    with pytest.raises(TypeError, match="async hooks"):
        SyncProxy(config=config)
    AsyncProxy(config=config)  # the async face runs them


def test_async_hooks_run_on_the_async_face(upstream: Upstream) -> None:
    async def run() -> httpx.Response:
        proxy = AsyncProxy(upstream.url, response_hooks=[async_tag_response], access_log=False)
        transport = httpx.ASGITransport(app=proxy)
        async with httpx.AsyncClient(transport=transport, base_url="http://front") as client:
            response = await client.get("/async-hook")
        await proxy.aclose()
        return response

    assert asyncio.run(run()).headers.get_list("x-hooked") == ["async"]


def test_a_hook_returning_something_else_is_a_clear_type_error() -> None:
    config = ProxyConfig.build("http://127.0.0.1:9", request_hooks=[lambda plan: "oops"])
    proxy = SyncProxy(config=config, access_log=False)
    with pytest.raises(TypeError, match="returned str, expected UpstreamPlan or None"):
        _collect(proxy, "/x")


def test_a_hook_refusing_with_any_status_answers_it_on_both_faces(upstream: Upstream) -> None:
    config = ProxyConfig.build(upstream.url, request_hooks=[refuse_499])
    for response in _get_both(config, "/refused"):
        assert response.status_code == 499
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["title"] == "Client Error"


# --- the framework glue routes one method list --------------------------------------------


def test_flask_and_fastapi_glue_route_the_same_methods(upstream: Upstream, rid: str) -> None:
    from fastapi import FastAPI
    from flask import Flask

    from dualproxy.core import PROXY_METHODS
    from dualproxy.fastapi import proxy_router
    from dualproxy.flask import proxy_blueprint

    flask_app = Flask(__name__)
    flask_app.register_blueprint(proxy_blueprint("methods", upstream.url, "/api",
                                                 access_log=False))
    flask_client = flask_app.test_client()
    flask_statuses = [flask_client.open("/api/m", method=m, headers={"x-req-id": rid}).status_code
                      for m in PROXY_METHODS]

    async def fastapi_statuses() -> list[int]:
        proxy = AsyncProxy(upstream.url, access_log=False)
        app = FastAPI()
        app.include_router(proxy_router(None, "/api", proxy=proxy))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://front") as client:
            statuses = [(await client.request(m, "/api/m", headers={"x-req-id": rid})).status_code
                        for m in PROXY_METHODS]
        await proxy.aclose()
        return statuses

    every_ok = dict.fromkeys(PROXY_METHODS, 200)
    assert dict(zip(PROXY_METHODS, flask_statuses, strict=True)) == every_ok
    assert dict(zip(PROXY_METHODS, asyncio.run(fastapi_statuses()), strict=True)) == every_ok
    assert [r.method for r in upstream.find_all(rid)] == [*PROXY_METHODS, *PROXY_METHODS]


@pytest.mark.parametrize(("options", "message"), [
    ({"mount": "/日本"}, "percent-encode it ('/%E6%97%A5%E6%9C%AC')"),
    ({"health_path": "/ü"}, "health_path '/ü' must be ASCII"),
    ({"timeout": 1e300}, "timeout must be more than 0 and at most 1000000 seconds"),
    ({"idle_timeout": float("nan")}, "idle_timeout must be"),
    ({"ws_idle_timeout": 1e7}, "ws_idle_timeout must be"),
    ({"pool_timeout": 0}, "pool_timeout must be"),
])
def test_config_refuses_what_would_fail_every_request(options: dict[str, object],
                                                      message: str) -> None:
    """Refused when built: each of these once failed every request instead."""
    with pytest.raises(ValueError, match=re.escape(message)):
        ProxyConfig.build("http://127.0.0.1:9", **options)


@pytest.mark.parametrize("face", [SyncProxy, AsyncProxy])
@pytest.mark.parametrize(("client_options", "upstream", "options", "message"), [
    ({"follow_redirects": True}, "http://127.0.0.1:9", {}, "follow_redirects=True"),
    ({"trust_env": True}, "http://127.0.0.1:9", {}, "(trust_env=False)"),
    ({}, "unix:/tmp/dualproxy-none.sock", {}, "a unix: upstream"),
    ({}, "https://127.0.0.1:9", {"verify": False}, "verify=/cert= on the proxy"),
    ({}, "https://127.0.0.1:9", {"cert": "pyproject.toml"}, "verify=/cert= on the proxy"),
])
def test_a_user_client_the_proxy_cannot_honour_is_refused(
        face: type[SyncProxy] | type[AsyncProxy], client_options: dict[str, Any],
        upstream: str, options: dict[str, Any], message: str) -> None:
    """Each once half-worked: a redirect followed to another host, HTTP_PROXY obeyed, TCP
    to 127.0.0.1:80 for a unix socket, verify/cert silently ignored."""
    kind = httpx.Client if face is SyncProxy else httpx.AsyncClient
    client = kind(**{"trust_env": False, **client_options})
    with pytest.raises(ValueError, match=re.escape(message)):
        face(upstream, client=client, **options)  # type: ignore[arg-type]


def test_a_user_client_relays_redirects_and_ignores_the_environment(
        upstream: Upstream, rid: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fitting user client is used on both faces; its follow_redirects turned on after
    the check is still overridden, and HTTP_PROXY (a dead port) plays no part."""
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("ALL_PROXY", f"http://127.0.0.1:{free_port()}")
    headers = {"x-req-id": rid, "x-upstream": "status code=302 location=http://elsewhere.test/x"}
    sync_client = httpx.Client(trust_env=False)
    sync = SyncProxy(upstream.url, client=sync_client, access_log=False)
    sync_client.follow_redirects = True
    with httpx.Client(transport=httpx.WSGITransport(app=sync), base_url="http://front") as c:
        sync_response = c.get("/moved", headers=headers)
    sync_client.close()

    async def run() -> httpx.Response:
        async with httpx.AsyncClient(trust_env=False) as own:
            proxy = AsyncProxy(upstream.url, client=own, access_log=False)
            own.follow_redirects = True
            transport = httpx.ASGITransport(app=proxy)
            async with httpx.AsyncClient(transport=transport, base_url="http://front") as c:
                return await c.get("/moved", headers=headers)

    for response in (sync_response, asyncio.run(run())):
        assert response.status_code == 302, response.text
        assert response.headers["location"] == "http://elsewhere.test/x"
    assert len(upstream.find_all(rid)) == 2
