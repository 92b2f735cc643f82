"""The Flask and FastAPI integrations, the examples and the demo, run as a user runs them.

Each app is started with its documented command (gunicorn or uvicorn as a
process on loopback) in front of the recording upstream. These tests are about
the framework glue, so they are not parametrized over pairings: each glue form
has exactly one natural server.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, MakeProxy, free_port
from tests.rawhttp import wait_until
from tests.upstream import Upstream, pattern_sha256

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MB = 1024 * 1024


class App:
    """A server process running one of the integration apps."""

    def __init__(self, args: list[str], upstream: Upstream, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "DUALPROXY_UPSTREAM": upstream.url, "EXAMPLE_TOKEN": TOKEN,
               "BIND": f"127.0.0.1:{port}"}
        self.log_path = Path(f"/tmp/dualproxy-integration-{port}.log")
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=self._log,
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
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def gunicorn(target: str, upstream: Upstream, *extra: str) -> App:
    port = free_port()
    return App([sys.executable, "-m", "gunicorn", *extra, "--bind", f"127.0.0.1:{port}",
                target], upstream, port)


def uvicorn(target: str, upstream: Upstream) -> App:
    port = free_port()
    return App([sys.executable, "-m", "uvicorn", target, "--no-proxy-headers",
                "--port", str(port), "--log-level", "info"], upstream, port)


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


# -- the Flask example on gunicorn ----------------------------------------------


def test_flask_example_pages_stay_flask(flask_example: App, upstream: Upstream,
                                        rid: str) -> None:
    response = httpx.get(flask_example.url + "/about", headers={"x-req-id": rid})
    assert response.status_code == 200 and "Uploads live under" in response.text
    assert upstream.find(rid) is None


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


def test_fastapi_example_streams_large_bodies(fastapi_example: App, upstream: Upstream,
                                              rid: str) -> None:
    upload_download(fastapi_example.url + "/api", upstream, rid, AUTH)


def test_fastapi_example_mounts_the_legacy_flask_app(fastapi_example: App, upstream: Upstream,
                                                     rid: str) -> None:
    response = httpx.get(fastapi_example.url + "/legacy/about")
    assert response.status_code == 200 and "Uploads live under" in response.text
    response = httpx.get(fastapi_example.url + "/legacy/upload/old%2Fpath",
                         headers={**AUTH, "x-req-id": rid})
    assert response.status_code == 200
    assert upstream.wait_record(rid).target == b"/old%2Fpath"


def test_fastapi_example_lifespan_shuts_down_cleanly(upstream: Upstream) -> None:
    app = uvicorn("examples.fastapi_app.app:app", upstream)
    assert httpx.get(app.url + "/health").status_code == 200
    # uvicorn re-raises the signal once its graceful shutdown is done.
    assert app.stop() in (0, -signal.SIGTERM)
    log = app.log()
    assert "Application startup complete" in log
    assert "Application shutdown complete" in log
    assert "Traceback" not in log


# -- the mount and middleware forms ------------------------------------------------


def test_fastapi_mount_strips_root_path(glue_apps: tuple[App, App], upstream: Upstream,
                                        rid: str) -> None:
    mounted, _ = glue_apps
    assert httpx.get(mounted.url + "/own").json() == {"served_by": "fastapi"}
    response = httpx.get(mounted.url + "/mnt/a%2Fb/c?z", headers={"x-req-id": rid})
    assert response.status_code == 200
    assert upstream.wait_record(rid).target == b"/base/a%2Fb/c?z"


def test_flask_middleware_falls_through(glue_apps: tuple[App, App], upstream: Upstream,
                                        rid: str) -> None:
    _, middleware = glue_apps
    response = httpx.get(middleware.url + "/own", headers={"x-req-id": rid})
    assert response.text == "served by flask"
    response = httpx.get(middleware.url + "/filesx", headers={"x-req-id": rid + "-x"})
    assert response.status_code == 404  # Flask's 404: /filesx is not under /files
    response = httpx.get(middleware.url + "/files/a%2Fb", headers={"x-req-id": rid + "-p"})
    assert response.status_code == 200
    assert upstream.wait_record(rid + "-p").target == b"/a%2Fb"  # mount stripped
    time.sleep(0.2)
    assert upstream.find(rid) is None and upstream.find(rid + "-x") is None


# -- dualproxy demo -------------------------------------------------------------


def test_demo_runs_and_its_commands_work() -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dualproxy", "demo", "--bind",
                             f"127.0.0.1:{port}"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        banner = ""
        while "Ctrl-C" not in banner:
            line = proc.stdout.readline()
            assert line, banner
            banner += line
        match = re.search(r"upstream on http://127\.0\.0\.1:(\d+)", banner)
        assert match, banner
        upstream_port = int(match.group(1))
        url = f"http://127.0.0.1:{port}"
        assert f"curl -s {url}/download" in banner and f"curl -sN {url}/events" in banner
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url + "/", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        size = 5 * MB
        response = httpx.get(f"{url}/download?size={size}", timeout=30)
        assert response.status_code == 200 and len(response.content) == size
        body = os.urandom(3 * MB)
        answer = httpx.post(url + "/upload", content=body, timeout=30).json()
        assert answer == {"received_bytes": len(body),
                          "sha256": hashlib.sha256(body).hexdigest()}
        with httpx.stream("GET", url + "/events?count=2", timeout=30) as events:
            assert events.headers["content-type"] == "text/event-stream"
            text = "".join(events.iter_text())
        assert text.count("data: ") == 2
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail("demo did not stop on Ctrl-C")
        finally:
            if proc.stdout is not None:
                proc.stdout.close()
    # The built-in upstream is gone with it.
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{upstream_port}/", timeout=2)


# -- operations: the access log (every pairing) -----------------------------------


def test_access_log_line_and_quiet_expected_failures(make_proxy: MakeProxy, rid: str) -> None:
    proxy = make_proxy()
    body = b"x" * 1234
    response = httpx.post(proxy.url + f"/logged/{rid}", content=body,
                          headers={"x-upstream": "download size=4321"})
    assert response.status_code == 200 and len(response.content) == 4321
    pattern = re.compile(
        rf"dualproxy\.access: POST /logged/{rid} 200 in=1234 out=4321 "
        r"upstream_ms=\d+\.\d total_ms=\d+\.\d ok")
    assert wait_until(lambda: pattern.search(proxy.log()) is not None), proxy.log()

    refused = make_proxy(upstream_url=f"http://127.0.0.1:{free_port()}")
    assert httpx.get(refused.url + f"/down/{rid}").status_code == 502
    assert wait_until(lambda: f"/down/{rid} 502" in refused.log())
    log = refused.log()
    warnings = [line for line in log.splitlines() if f"GET /down/{rid} -> 502" in line]
    assert len(warnings) == 1, log
    assert "ConnectError" in warnings[0]
    assert "Traceback" not in log


@pytest.mark.parametrize("command", ["wsgi-on-uvicorn", "asgi-on-gunicorn"])
def test_examples_under_the_other_servers(upstream: Upstream, rid: str, command: str) -> None:
    """The README's plain server commands for the two cross pairings."""
    if command == "wsgi-on-uvicorn":
        app = uvicorn("examples.flask_app.asgi:app", upstream)
        prefix = "/upload"
    else:
        app = gunicorn("examples.fastapi_app.app:app", upstream,
                       "-k", "dualproxy.workers.UvicornWorker")
        prefix = "/api"
    try:
        response = httpx.get(app.url + prefix + "/a%2Fb?q", headers={**AUTH, "x-req-id": rid},
                             timeout=30)
        assert response.status_code == 200
        record = upstream.wait_record(rid)
        assert record.target == b"/a%2Fb?q"
        assert record.header("x-forwarded-for") == "127.0.0.1"
        upload_download(app.url + prefix, upstream, rid, AUTH)
    finally:
        app.stop()
