"""The Flask and FastAPI integrations, the examples and the demo, run as a user runs them.

Each app is started with its documented command (gunicorn or uvicorn as a
process on loopback) in front of the recording upstream. These tests are about
the framework glue, so they are not parametrized over pairings: each glue form
has one natural server (the examples also run once under the two cross servers).
Only the access-log tests take the pairing fixture: they read `dualproxy serve`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from dualproxy.cli import build_parser
from tests.conftest import ROOT, ChildLog, MakeProxy, free_port, stop_group
from tests.rawhttp import RawResponse, exchange, request_bytes, wait_until
from tests.upstream import Upstream, pattern_sha256

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MB = 1024 * 1024


class App:
    """A server process running one of the integration apps."""

    def __init__(self, args: list[str], upstream: Upstream, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "DUALPROXY_UPSTREAM": upstream.url, "EXAMPLE_TOKEN": TOKEN,
               "BIND": f"127.0.0.1:{port}"}
        self._log = ChildLog(f"dualproxy-integration-{port}-")
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=self._log.file,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(self.log())
            try:
                httpx.get(self.url + "/", timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError(f"app did not start:\n{self.log()}")

    def log(self) -> str:
        return self._log.text()

    def stop(self) -> int:
        stop_group(self.proc, timeout=15)
        self._log.close()
        return self.proc.returncode


def raw_get(app: App, target: str, rid: str, headers: dict[str, str]) -> RawResponse:
    """GET with the target sent byte for byte (httpx would normalise it)."""
    return exchange(app.port, request_bytes("GET", target, [*headers.items(),
                                                            ("x-req-id", rid)]))


def gunicorn(target: str, upstream: Upstream, *extra: str) -> App:
    port = free_port()
    return App([sys.executable, "-m", "gunicorn", *extra, "--bind", f"127.0.0.1:{port}",
                target], upstream, port)


def uvicorn(target: str, upstream: Upstream, *extra: str) -> App:
    port = free_port()
    return App([sys.executable, "-m", "uvicorn", target, "--no-proxy-headers",
                "--port", str(port), "--log-level", "info", *extra], upstream, port)


@pytest.fixture(scope="module")
def flask_example(upstream: Upstream) -> Iterator[App]:
    app = gunicorn("examples.flask_app.app:app", upstream,
                   "-c", "examples/flask_app/gunicorn.conf.py")
    yield app
    app.stop()


@pytest.fixture(scope="module")
def fastapi_example(upstream: Upstream) -> Iterator[App]:
    app = uvicorn("examples.fastapi_app.app:app", upstream)
    yield app
    app.stop()


@pytest.fixture(scope="module")
def glue_apps(upstream: Upstream) -> Iterator[tuple[App, App]]:
    mounted = uvicorn("tests.integration_apps:fastapi_mount", upstream)
    middleware = gunicorn("tests.integration_apps:flask_middleware", upstream,
                          "-k", "gthread", "--threads", "8")
    yield mounted, middleware
    mounted.stop()
    middleware.stop()


def upload_download(base: str, upstream: Upstream, rid: str, headers: dict[str, str]) -> None:
    """A 20 MB chunked upload and a 20 MB streamed download, both hashed end to end."""
    size = 20 * MB
    digest = hashlib.sha256()

    def chunks() -> Iterator[bytes]:
        block = os.urandom(MB)
        for _ in range(size // MB):
            digest.update(block)
            yield block

    with httpx.Client(timeout=60) as client:
        response = client.put(base + "/blob", content=chunks(),
                              headers={**headers, "x-req-id": rid + "-up"})
        assert response.status_code == 200, response.text
        record = upstream.wait_record(rid + "-up")
        assert record.complete and record.body_length == size
        assert record.body_sha256 == digest.hexdigest()
        assert record.framing == "chunked"

        down = hashlib.sha256()
        with client.stream("GET", base + "/blob", headers={
                **headers, "x-req-id": rid + "-down",
                "x-upstream": f"download size={size} chunked=1"}) as stream:
            assert stream.status_code == 200
            for chunk in stream.iter_raw():
                down.update(chunk)
        assert down.hexdigest() == pattern_sha256(size)


def assert_streams(base: str, upstream: Upstream, rid: str, headers: dict[str, str]) -> None:
    """Both bodies stream through this integration form, neither is buffered.

    The upload: the upstream sees the first piece while the client still holds the
    rest. The download: the client gets the first chunk while the upstream is parked
    on a gate. A form that buffered either body would stall here instead.
    """
    first, rest = os.urandom(256 * 1024), os.urandom(MB)
    seen_early: list[bool] = []

    def upload() -> Iterator[bytes]:
        yield first
        seen_early.append(wait_until(
            lambda: (r := upstream.find(rid + "-up")) is not None and r.t_first_body is not None,
            timeout=15))
        yield rest

    with httpx.Client(timeout=httpx.Timeout(30.0, read=10.0)) as client:
        response = client.post(base + "/stream-up", content=upload(),
                               headers={**headers, "x-req-id": rid + "-up"})
        assert response.status_code == 200, response.text
        assert seen_early == [True], "the upstream saw nothing before the upload ended"
        record = upstream.wait_record(rid + "-up", complete=True)
        assert record.body_sha256 == hashlib.sha256(first + rest).hexdigest()

        gate_name = f"gate-{rid}"
        gate = upstream.gate(gate_name)
        try:
            with client.stream("GET", base + "/stream-down", headers={
                    **headers, "x-req-id": rid + "-down",
                    "x-upstream": f"download size={MB} gate={gate_name}"}) as stream:
                assert stream.status_code == 200
                chunks = stream.iter_raw()
                try:
                    received = len(next(chunks))
                except httpx.ReadTimeout:
                    pytest.fail("no body reached the client while the upstream was parked")
                assert not gate.is_set() and 0 < received < MB
                gate.set()
                received += sum(len(chunk) for chunk in chunks)
            assert received == MB
        finally:
            gate.set()


def assert_redirect_rewritten(base: str, mount: str, upstream: Upstream, upstream_base: str,
                              rid: str, headers: dict[str, str]) -> None:
    """A Location on the upstream base comes back under the mount the request came in on."""
    location = f"{upstream.url}{upstream_base}/elsewhere?x=1"
    response = httpx.get(base + "/moved", headers={
        **headers, "x-req-id": rid, "x-upstream": f"status code=302 location={location}"})
    assert response.status_code == 302  # relayed, not followed
    assert response.headers["location"] == f"{mount}/elsewhere?x=1"
    assert upstream.wait_record(rid).target == f"{upstream_base}/moved".encode()


# -- the Flask example on gunicorn ----------------------------------------------


def test_flask_example_pages_stay_flask(flask_example: App, upstream: Upstream,
                                        rid: str) -> None:
    response = httpx.get(flask_example.url + "/about", headers={"x-req-id": rid})
    assert response.status_code == 200 and "Uploads live under" in response.text
    with httpx.Client(base_url=flask_example.url) as client:
        form = client.post("/contact", data={"message": "hello"}, headers={"x-req-id": rid})
        assert form.status_code == 200 and "Message received" in form.text
        assert "hello" in client.get("/contact").text  # kept in Flask's session
    # Outside the prefix (/uploadx is not under /upload) the request is Flask's: 404.
    response = httpx.get(flask_example.url + "/uploadx", headers={**AUTH, "x-req-id": rid})
    assert response.status_code == 404 and "Not Found" in response.text
    time.sleep(0.2)
    assert upstream.find(rid) is None


def test_flask_example_forwards_every_path_shape(flask_example: App, upstream: Upstream,
                                                 rid: str) -> None:
    """Flask's routing neither merges slashes nor redirects; the core still refuses climbs."""
    cases = {"/upload": b"/", "/upload/": b"/", "/upload//x": b"//x",
             "/upload/a//b/": b"/a//b/", "/upload/a%20b/c%2Fd?q=%2F&r": b"/a%20b/c%2Fd?q=%2F&r"}
    for n, (path, target) in enumerate(cases.items()):
        response = raw_get(flask_example, path, f"{rid}-{n}", AUTH)
        assert response.status == 200, (path, response)
        assert upstream.wait_record(f"{rid}-{n}").target == target, path
    climb = raw_get(flask_example, "/upload/a/%2e%2e/%2e%2e/etc", rid + "-climb", AUTH)
    assert climb.status == 400
    assert {k.lower(): v for k, v in climb.headers}["content-type"] == "application/problem+json"
    # Werkzeug routes `//upload/x` to the blueprint, but the raw target is not under /upload.
    outside = raw_get(flask_example, "//upload/x", rid + "-outside", AUTH)
    assert outside.status == 404
    time.sleep(0.2)
    assert upstream.find(rid + "-climb") is None and upstream.find(rid + "-outside") is None


def test_flask_example_streams_and_rewrites_redirects(flask_example: App, upstream: Upstream,
                                                      rid: str) -> None:
    assert_streams(flask_example.url + "/upload", upstream, rid, AUTH)
    assert_redirect_rewritten(flask_example.url + "/upload", "/upload", upstream, "",
                              rid + "-r", AUTH)


def test_flask_example_auth_runs_before_the_proxy(flask_example: App, upstream: Upstream,
                                                  rid: str) -> None:
    response = httpx.get(flask_example.url + "/upload/secret", headers={"x-req-id": rid})
    assert response.status_code == 401
    time.sleep(0.2)
    assert upstream.find(rid) is None
    response = httpx.get(flask_example.url + "/upload/a%2Fb?x&y=",
                         headers={**AUTH, "x-req-id": rid + "-ok"})
    assert response.status_code == 200
    assert upstream.wait_record(rid + "-ok").target == b"/a%2Fb?x&y="


def test_flask_example_session_login_opens_the_upload_area(flask_example: App,
                                                           upstream: Upstream, rid: str) -> None:
    with httpx.Client(base_url=flask_example.url) as client:
        assert client.post("/login", data={"user": "ada"}).status_code == 302
        assert "Hello, ada" in client.get("/").text
        response = client.get("/upload/mine", headers={"x-req-id": rid})
        assert response.status_code == 200
        assert "Hello, ada" in client.get("/").text  # the session survived the proxy
    assert upstream.wait_record(rid).target == b"/mine"


def test_flask_example_streams_large_bodies(flask_example: App, upstream: Upstream,
                                            rid: str) -> None:
    upload_download(flask_example.url + "/upload", upstream, rid, AUTH)


def test_flask_blueprint_adds_no_content_type(flask_example: App, upstream: Upstream,
                                              rid: str) -> None:
    response = httpx.get(flask_example.url + "/upload/x", headers={
        **AUTH, "x-req-id": rid, "x-upstream": "headers",
        "x-upstream-headers": '[["X-Only", "1"]]'})
    assert response.status_code == 200
    assert response.headers.get("x-only") == "1"
    assert "content-type" not in response.headers


@pytest.mark.parametrize("example", ["flask_example", "fastapi_example"])
def test_examples_show_the_proxy_metrics(example: str, request: pytest.FixtureRequest,
                                         rid: str) -> None:
    from tests.test_metrics import parse, value

    app: App = request.getfixturevalue(example)
    path = "/upload/m" if example == "flask_example" else "/api/m"
    labels = {"route": "/", "method": "GET", "status_class": "2xx"}

    def count() -> float:
        return value(parse(httpx.get(app.url + "/metrics").text),
                     "dualproxy_requests_total", **labels)

    before = count()
    assert httpx.get(app.url + path, headers={**AUTH, "x-req-id": rid}).status_code == 200
    assert wait_until(lambda: count() == before + 1)


# -- the FastAPI example on uvicorn ---------------------------------------------


def test_fastapi_example_routes_and_auth(fastapi_example: App, upstream: Upstream,
                                         rid: str) -> None:
    assert httpx.get(fastapi_example.url + "/health").json() == {"status": "ok"}
    response = httpx.get(fastapi_example.url + "/api/thing", headers={"x-req-id": rid})
    assert response.status_code == 401
    time.sleep(0.2)
    assert upstream.find(rid) is None
    response = httpx.get(fastapi_example.url + "/api/thing%2Fx?q&r=",
                         headers={**AUTH, "x-req-id": rid + "-ok"})
    assert response.status_code == 200
    record = upstream.wait_record(rid + "-ok")
    assert record.target == b"/thing%2Fx?q&r="
    assert record.header("x-forwarded-for") == "127.0.0.1"
    response = httpx.get(fastapi_example.url + "/api", headers={**AUTH, "x-req-id": rid + "-r"})
    assert response.status_code == 200
    assert upstream.wait_record(rid + "-r").target == b"/"
    response = raw_get(fastapi_example, "/api//x/%2e", rid + "-s", AUTH)
    assert response.status == 200
    assert upstream.wait_record(rid + "-s").target == b"//x/%2e"
    assert raw_get(fastapi_example, "//api/x", rid + "-o", AUTH).status == 404
    # /apix is not under /api: FastAPI's own 404, with or without a token.
    response = httpx.get(fastapi_example.url + "/apix", headers={**AUTH, "x-req-id": rid + "-x"})
    assert response.status_code == 404 and response.json() == {"detail": "Not Found"}
    time.sleep(0.2)
    assert upstream.find(rid + "-x") is None and upstream.find(rid + "-o") is None


def test_fastapi_example_streams_large_bodies(fastapi_example: App, upstream: Upstream,
                                              rid: str) -> None:
    upload_download(fastapi_example.url + "/api", upstream, rid, AUTH)


def test_fastapi_example_router_streams_and_rewrites_redirects(fastapi_example: App,
                                                               upstream: Upstream,
                                                               rid: str) -> None:
    assert_streams(fastapi_example.url + "/api", upstream, rid, AUTH)
    assert_redirect_rewritten(fastapi_example.url + "/api", "/api", upstream, "",
                              rid + "-r", AUTH)


def test_fastapi_example_mounts_the_legacy_flask_app(fastapi_example: App, upstream: Upstream,
                                                     rid: str) -> None:
    legacy = fastapi_example.url + "/legacy"
    response = httpx.get(legacy + "/about")
    assert response.status_code == 200 and "Uploads live under" in response.text
    # The legacy app's own before_request auth still guards its proxied area.
    response = httpx.get(legacy + "/upload/old", headers={"x-req-id": rid + "-401"})
    assert response.status_code == 401
    with httpx.Client(base_url=legacy) as client:  # and its session login still works
        assert client.post("/login", data={"user": "grace"}).status_code == 302
        assert client.get("/upload/mine", headers={"x-req-id": rid + "-s"}).status_code == 200
        assert "Hello, grace" in client.get("/").text
    assert upstream.wait_record(rid + "-s").target == b"/mine"
    response = raw_get(fastapi_example, "/legacy/upload/old%2Fpath?a&b=", rid, AUTH)
    assert response.status == 200
    assert upstream.wait_record(rid).target == b"/old%2Fpath?a&b="
    assert upstream.find(rid + "-401") is None


def nav_links(page: str) -> list[str]:
    return re.findall(r'<a href="([^"]*)"', page.split("<nav>", 1)[1].split("</nav>", 1)[0])


@pytest.mark.parametrize("mount", ["", "/legacy"])
def test_example_flask_pages_link_inside_their_mount(flask_example: App, fastapi_example: App,
                                                     mount: str) -> None:
    """On gunicorn at / and mounted in FastAPI at /legacy, every nav link stays in the app."""
    base = (fastapi_example if mount else flask_example).url
    links = nav_links(httpx.get(base + mount + "/about").text)
    assert links == [f"{mount}/", f"{mount}/about", f"{mount}/contact", f"{mount}/login"]
    for link in links:
        response = httpx.get(base + link)
        assert response.status_code == 200 and nav_links(response.text) == links, link


def test_fastapi_example_legacy_flask_app_streams(fastapi_example: App, upstream: Upstream,
                                                  rid: str) -> None:
    base = fastapi_example.url + "/legacy/upload"
    assert_streams(base, upstream, rid, AUTH)
    upload_download(base, upstream, rid + "-big", AUTH)
    assert_redirect_rewritten(base, "/legacy/upload", upstream, "", rid + "-r", AUTH)


def test_fastapi_example_lifespan_shuts_down_cleanly(upstream: Upstream) -> None:
    app = uvicorn("examples.fastapi_app.app:app", upstream)
    assert httpx.get(app.url + "/api/x", headers=AUTH).status_code == 200
    # uvicorn re-raises the signal once its graceful shutdown is done.
    assert app.stop() in (0, -signal.SIGTERM)
    log = app.log()
    assert "Application startup complete" in log
    assert "Application shutdown complete" in log
    assert "Traceback" not in log


def test_proxy_lifespan_opens_and_closes_the_clients(upstream: Upstream, rid: str) -> None:
    app = uvicorn("tests.integration_apps:fastapi_mount", upstream)
    try:
        # Opened by the lifespan at startup, before any request needed them.
        assert wait_until(lambda: "clients open at startup: True" in app.log()), app.log()
        response = httpx.get(app.url + "/mnt/x", headers={"x-req-id": rid})
        assert response.status_code == 200
        assert upstream.wait_record(rid).target == b"/base/x"
    finally:
        code = app.stop()
    log = app.log()
    assert code in (0, -signal.SIGTERM), log
    assert "lifespan: clients closed at shutdown: True" in log
    assert "Application shutdown complete" in log and "Traceback" not in log


# -- the mount, router and middleware forms ----------------------------------------


def test_fastapi_mount_strips_root_path(glue_apps: tuple[App, App], upstream: Upstream,
                                        rid: str) -> None:
    mounted, _ = glue_apps
    assert httpx.get(mounted.url + "/own").json() == {"served_by": "fastapi"}
    response = raw_get(mounted, "/mnt/a%2Fb/c?z&y=", rid, {})
    assert response.status == 200
    assert upstream.wait_record(rid).target == b"/base/a%2Fb/c?z&y="
    # /mntx is not under the /mnt mount: Starlette's 404, nothing forwarded.
    assert raw_get(mounted, "/mntx/y", rid + "-x", {}).status == 404
    assert_streams(mounted.url + "/mnt", upstream, rid + "-s", {})
    assert_redirect_rewritten(mounted.url + "/mnt", "/mnt", upstream, "/base", rid + "-r", {})
    time.sleep(0.2)
    assert upstream.find(rid + "-x") is None


def test_fastapi_router_under_an_include_prefix(glue_apps: tuple[App, App], upstream: Upstream,
                                                rid: str) -> None:
    mounted, _ = glue_apps
    response = raw_get(mounted, "/v1/r/a%2Fb?q", rid, {})
    assert response.status == 200
    assert upstream.wait_record(rid).target == b"/routed/a%2Fb?q"
    assert raw_get(mounted, "/v1/r", rid + "-root", {}).status == 200
    assert upstream.wait_record(rid + "-root").target == b"/routed"
    assert raw_get(mounted, "/r/x", rid + "-x", {}).status == 404
    assert_redirect_rewritten(mounted.url + "/v1/r", "/v1/r", upstream, "/routed",
                              rid + "-red", {})
    time.sleep(0.2)
    assert upstream.find(rid + "-x") is None


def test_fastapi_forms_under_uvicorn_root_path(upstream: Upstream, rid: str) -> None:
    """Behind a front proxy that strips /svc (`uvicorn --root-path /svc`): the public
    prefix is /svc, the forwarded path is still only what follows the mount."""
    app = uvicorn("tests.integration_apps:fastapi_mount", upstream, "--root-path", "/svc")
    try:
        response = raw_get(app, "/mnt/a%2Fb", rid, {})
        assert response.status == 200
        assert upstream.wait_record(rid).target == b"/base/a%2Fb"
        response = raw_get(app, "/v1/r/c", rid + "-r", {})
        assert response.status == 200
        assert upstream.wait_record(rid + "-r").target == b"/routed/c"
        # Redirects come back on the public path, root_path included.
        assert_redirect_rewritten(app.url + "/mnt", "/svc/mnt", upstream, "/base",
                                  rid + "-red", {})
    finally:
        app.stop()


def test_flask_middleware_falls_through(glue_apps: tuple[App, App], upstream: Upstream,
                                        rid: str) -> None:
    _, middleware = glue_apps
    response = httpx.get(middleware.url + "/own", headers={"x-req-id": rid})
    assert response.text == "served by flask"
    response = httpx.get(middleware.url + "/filesx", headers={"x-req-id": rid + "-x"})
    assert response.status_code == 404  # Flask's 404: /filesx is not under /files
    response = raw_get(middleware, "/files/a%2Fb//c?d", rid + "-p", {})
    assert response.status == 200
    assert upstream.wait_record(rid + "-p").target == b"/a%2Fb//c?d"  # mount stripped
    assert_streams(middleware.url + "/files", upstream, rid + "-s", {})
    assert_redirect_rewritten(middleware.url + "/files", "/files", upstream, "", rid + "-r", {})
    time.sleep(0.2)
    assert upstream.find(rid) is None and upstream.find(rid + "-x") is None


def test_flask_blueprint_registered_under_another_prefix(glue_apps: tuple[App, App],
                                                         upstream: Upstream, rid: str) -> None:
    _, middleware = glue_apps
    response = raw_get(middleware, "/tenant/store/a%2Fb?x", rid, {})
    assert response.status == 200
    assert upstream.wait_record(rid).target == b"/bp/a%2Fb?x"
    assert raw_get(middleware, "/ignored/a", rid + "-x", {}).status == 404
    assert_streams(middleware.url + "/tenant/store", upstream, rid + "-s", {})
    assert_redirect_rewritten(middleware.url + "/tenant/store", "/tenant/store", upstream,
                              "/bp", rid + "-r", {})
    time.sleep(0.2)
    assert upstream.find(rid + "-x") is None


def test_two_flask_proxies_in_one_app(upstream: Upstream, rid: str) -> None:
    """Two FlaskProxy in one app: gunicorn boots it (blueprint names derived from the
    prefixes do not clash) and each prefix goes to its own upstream base."""
    app = gunicorn("tests.integration_apps:flask_two_proxies", upstream,
                   "-k", "gthread", "--threads", "4")
    try:
        for prefix in ("one", "two"):
            response = raw_get(app, f"/{prefix}/x%2Fy?q", f"{rid}-{prefix}", {})
            assert response.status == 200, app.log()
            assert upstream.wait_record(f"{rid}-{prefix}").target == f"/{prefix}/x%2Fy?q".encode()
    finally:
        app.stop()


# -- dualproxy demo -------------------------------------------------------------


@pytest.mark.parametrize("adapter", ["asgi", "wsgi"])
def test_demo_runs_and_its_commands_work(adapter: str) -> None:
    """`dualproxy demo`: the three printed curl commands, done with httpx, then Ctrl-C."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dualproxy", "demo", "--bind",
                             f"127.0.0.1:{port}", "--adapter", adapter], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    output = ""
    try:
        assert proc.stdout is not None
        while "Ctrl-C" not in output:
            line = proc.stdout.readline()
            assert line, output
            output += line
        banner = output
        upstream_match = re.search(r"upstream on http://127\.0\.0\.1:(\d+)", banner)
        proxy_match = re.search(rf"proxy \({adapter}\) on (http://\S+)", banner)
        assert upstream_match and proxy_match, banner
        upstream_port = int(upstream_match.group(1))
        url = proxy_match.group(1)
        assert url == f"http://127.0.0.1:{port}"
        commands = re.findall(r"^\s+(curl .*?)\s*$", banner, re.MULTILINE)
        assert len(commands) == 3, banner
        download = re.search(r"curl -s (\S+/download\?size=(\d+)) \| sha256sum", commands[0])
        upload = re.search(r"-H 'Transfer-Encoding: chunked' (\S+/upload)$", commands[1])
        upload_size = re.search(r"head -c (\d+) /dev/urandom", banner)
        events = re.search(r"curl -sN (\S+/events)$", commands[2])
        assert download and upload and upload_size and events, commands
        assert wait_until(lambda: _answers(url), timeout=30), output

        # 1. the streamed download, hashed on arrival
        size = int(download.group(2))
        digest = hashlib.sha256()
        with httpx.stream("GET", download.group(1), timeout=60) as response:
            assert response.status_code == 200
            for chunk in response.iter_raw():
                digest.update(chunk)
        block, expected = bytes(range(256)) * 256, hashlib.sha256()
        for _ in range(size // len(block)):
            expected.update(block)
        expected.update(block[:size % len(block)])
        assert digest.hexdigest() == expected.hexdigest()
        printed = re.search(r"^\s+#\s+([0-9a-f]{64})  -$", banner, re.MULTILINE)
        assert printed and printed.group(1) == expected.hexdigest(), banner

        # 2. the chunked upload; the upstream answers with the hash it received
        upload_bytes = int(upload_size.group(1))
        sent = hashlib.sha256()

        def chunks() -> Iterator[bytes]:
            piece = os.urandom(MB)
            for _ in range(upload_bytes // MB):
                sent.update(piece)
                yield piece

        answer = httpx.put(upload.group(1), content=chunks(), timeout=60).json()
        assert answer == {"received_bytes": upload_bytes, "sha256": sent.hexdigest()}

        # 3. the SSE clock: events arrive one by one, and go on past five (until stopped)
        with httpx.stream("GET", events.group(1), timeout=30) as stream:
            assert stream.headers["content-type"] == "text/event-stream"
            seen = ""
            for text in stream.iter_text():
                seen += text
                if seen.count("data: ") >= 7:
                    break
            assert re.search(r"id: 0\ndata: \S+ tick 0\n\n", seen), seen
            assert re.search(r"id: 6\ndata: \S+ tick 6\n\n", seen), seen
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group
        try:
            rest, _ = proc.communicate(timeout=10)
            output += rest
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            pytest.fail(f"demo did not stop within 10 s of Ctrl-C:\n{output}")
    assert proc.returncode == 0, output
    assert "Traceback" not in output, output
    # The built-in upstream is gone with it.
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{upstream_port}/", timeout=2)


@pytest.mark.parametrize("command", [[], ["serve"], ["demo"]])
def test_help_explains_every_flag_with_its_default(command: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", "dualproxy", *command, "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=30, check=True)
    text = result.stdout
    assert text.startswith(f"usage: dualproxy {' '.join(command)}".rstrip()), text
    if not command:
        assert "serve" in text and "demo" in text
        return
    # Each flag's help, from its first line to the next flag, names its default.
    entries = re.split(r"\n  (?=-)", text.split("options:", 1)[1])[1:]
    flags = [entry.split()[0] for entry in entries]
    assert "-h," in flags
    # Every option the parser declares is listed (counted from the parser itself, so a
    # new flag needs no edit here, yet a flag hidden from --help fails).
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    declared = [a for a in sub.choices[command[0]]._actions if a.option_strings]
    assert len(flags) == len(declared), flags
    for entry in entries:
        if not entry.startswith("-h"):
            assert "(default: " in entry or "(required)" in entry, entry


def _answers(url: str) -> bool:
    try:
        httpx.get(url + "/", timeout=1)
        return True
    except httpx.TransportError:
        return False


# -- operations: the access log (every pairing) -----------------------------------


def test_access_log_line_and_quiet_expected_failures(make_proxy: MakeProxy, rid: str) -> None:
    proxy = make_proxy()
    body = b"x" * 1234
    response = httpx.post(proxy.url + f"/logged/{rid}", content=body,
                          headers={"x-upstream": "download size=4321"})
    assert response.status_code == 200 and len(response.content) == 4321
    pattern = re.compile(
        rf"dualproxy\.access: POST /logged/{rid} 200 in=1234 out=4321 "
        r"upstream_ms=\d+\.\d total_ms=\d+\.\d client=127\.0\.0\.1 ok")
    assert wait_until(lambda: pattern.search(proxy.log()) is not None), proxy.log()

    refused = make_proxy(upstream_url=f"http://127.0.0.1:{free_port()}")
    assert httpx.get(refused.url + f"/down/{rid}").status_code == 502
    assert wait_until(lambda: f"/down/{rid} 502" in refused.log())
    log = refused.log()
    warnings = [line for line in log.splitlines() if f"GET /down/{rid} -> 502" in line]
    assert len(warnings) == 1, log
    assert "ConnectError" in warnings[0]
    assert "Traceback" not in log


def test_no_access_log_keeps_the_error_line(make_proxy: MakeProxy, rid: str) -> None:
    """`--no-access-log` drops the per-request line, not the warning about a failure."""
    refused = make_proxy("--no-access-log", upstream_url=f"http://127.0.0.1:{free_port()}")
    assert httpx.get(refused.url + f"/quiet/{rid}").status_code == 502
    assert wait_until(lambda: f"GET /quiet/{rid} -> 502" in refused.log()), refused.log()
    time.sleep(0.3)  # the access line, were it written, comes right after
    log = refused.log()
    assert "dualproxy.access" not in log, log
    assert sum(f"/quiet/{rid}" in line for line in log.splitlines()) == 1, log
    assert "Traceback" not in log


@pytest.mark.parametrize("command", ["wsgi-on-uvicorn", "asgi-on-gunicorn"])
def test_examples_under_the_other_servers(upstream: Upstream, rid: str, command: str) -> None:
    """The README's plain server commands for the two cross pairings."""
    if command == "wsgi-on-uvicorn":
        app = uvicorn("examples.flask_app.asgi:app", upstream)
        prefix = "/upload"
    else:
        app = gunicorn("examples.fastapi_app.app:app", upstream,
                       "-k", "dualproxy.servers.worker.UvicornWorker")
        prefix = "/api"
    try:
        response = httpx.get(app.url + prefix + "/a%2Fb?q", headers={**AUTH, "x-req-id": rid},
                             timeout=30)
        assert response.status_code == 200
        record = upstream.wait_record(rid)
        assert record.target == b"/a%2Fb?q"
        assert record.header("x-forwarded-for") == "127.0.0.1"
        upload_download(app.url + prefix, upstream, rid, AUTH)
        assert_streams(app.url + prefix, upstream, rid + "-s", AUTH)
    finally:
        app.stop()
