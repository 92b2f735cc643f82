"""`dualproxy serve --config FILE.toml`: several routes in one process, on every pairing.

One config file routes `/api`, `/api/v2` and `/files` to two recording upstreams and
`/live` to a WebSocket upstream, with different options per route; the proxy runs
two workers, so each worker rebuilds the routes from the JSON options. Bad files
go through the real CLI (a subprocess): exit 2, one line naming file, line, key
and route, before any server starts. The route table itself is pure: unit tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from dualproxy import AsyncProxy, AsyncRouter, SyncProxy, SyncRouter
from dualproxy.cli import load_config_file
from dualproxy.routes import RouteTable
from dualproxy.target import path_readings
from tests.conftest import ROOT, ProxyPool, ProxyProcess
from tests.rawhttp import RawResponse, exchange, request_bytes
from tests.upstream import Upstream
from tests.ws_upstream import WsUpstream

EXAMPLE = ROOT / "examples" / "dualproxy.toml"


@pytest.fixture(scope="session")
def second_upstream() -> Iterator[Upstream]:
    server = Upstream().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def live_upstream() -> Iterator[WsUpstream]:
    server = WsUpstream().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def routes_file(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream,
                second_upstream: Upstream, live_upstream: WsUpstream) -> Path:
    path = tmp_path_factory.mktemp("config") / "dualproxy.toml"
    path.write_text(f"""\
workers = 2
bind = "127.0.0.1:1"        # the command line's --bind wins
access_log_format = "json"

[[route]]
mount = "/api"
upstream = "{upstream.url}/a-base"
timeout = 5
idle_timeout = 10
max_body_size = "1K"

[[route]]
mount = "/api/v2"
upstream = ["{second_upstream.url}/v2-base"]
timeout = 5

[[route]]
mount = "/files"
upstream = "{second_upstream.url}/files-base"
timeout = 5.5
max_body_size = 1048576

[[route]]
mount = "/live"
upstream = "{live_upstream.url}"
""")
    return path


@pytest.fixture
def routed(pairing: str, proxy_pool: ProxyPool, routes_file: Path) -> ProxyProcess:
    return proxy_pool.get(pairing, "", ("--config", str(routes_file)))


def send(proxy: ProxyProcess, target: str, rid: str, method: str = "GET",
         body: bytes | None = None) -> RawResponse:
    return exchange(proxy.port, request_bytes(method, target, [("x-req-id", rid)], body))


@pytest.mark.parametrize(("target", "which", "expected"), [
    ("/api/x?q=1", "first", b"/a-base/x?q=1"),
    ("/api/", "first", b"/a-base/"),
    ("/api/v2x", "first", b"/a-base/v2x"),        # a segment boundary: not /api/v2
    ("/api/v2/y", "second", b"/v2-base/y"),       # the longest mount wins
    ("/api/v2/", "second", b"/v2-base/"),
    ("/files/f.txt", "second", b"/files-base/f.txt"),
    ("http://example.test/files/g?x", "second", b"/files-base/g?x"),  # absolute-form
])
def test_each_mount_reaches_its_upstream(routed: ProxyProcess, upstream: Upstream,
                                         second_upstream: Upstream, rid: str, target: str,
                                         which: str, expected: bytes) -> None:
    chosen, other = ((upstream, second_upstream) if which == "first"
                     else (second_upstream, upstream))
    response = send(routed, target, rid)
    record = chosen.wait_record(rid)
    assert response.status == 200 and response.complete
    assert record.target == expected
    assert record.header_all("host") == [chosen.url.removeprefix("http://")]
    assert other.find(rid) is None


@pytest.mark.parametrize("target", ["/", "/apix", "/file", "/files2/x", "/other?/api/x"])
def test_outside_every_mount_is_404(routed: ProxyProcess, upstream: Upstream,
                                    second_upstream: Upstream, rid: str, target: str) -> None:
    response = send(routed, target, rid)
    assert response.status == 404
    assert response.header("content-type") == "application/problem+json"
    assert json.loads(response.body)["status"] == 404
    time.sleep(0.2)
    assert upstream.find(rid) is None and second_upstream.find(rid) is None


def test_each_route_has_its_own_options(routed: ProxyProcess, upstream: Upstream,
                                        second_upstream: Upstream, rid: str) -> None:
    body = b"x" * 2048
    refused = send(routed, "/api/upload", rid, "POST", body)
    assert refused.status == 413
    assert refused.header("content-type") == "application/problem+json"
    accepted = send(routed, "/files/upload", rid, "POST", body)
    assert accepted.status == 200
    record = second_upstream.wait_record(rid)
    assert record.body_length == 2048 and record.complete
    assert upstream.find(rid) is None
    small = send(routed, "/api/upload", rid + "-small", "POST", b"y" * 1024)
    assert small.status == 200
    assert upstream.wait_record(rid + "-small").body_length == 1024


def test_access_log_names_the_route(routed: ProxyProcess, second_upstream: Upstream,
                                    rid: str) -> None:
    """The file's server options apply (json access lines), each naming its route."""
    assert send(routed, f"/api/v2/logged-{rid}", rid).status == 200
    second_upstream.wait_record(rid)

    def line() -> dict[str, object] | None:
        for text in routed.log().splitlines():
            if f"logged-{rid}" in text and text.startswith("{"):
                entry: dict[str, object] = json.loads(text)
                return entry
        return None

    deadline = time.monotonic() + 5
    while line() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    entry = line()
    assert entry is not None, routed.log()[-2000:]
    assert entry["route"] == "/api/v2" and entry["status"] == 200
    assert entry["upstream"] == second_upstream.url


def test_websocket_follows_its_route(routed: ProxyProcess, live_upstream: WsUpstream,
                                     rid: str) -> None:
    url = f"ws://127.0.0.1:{routed.port}"
    with connect(f"{url}/live/echo", additional_headers={"x-req-id": rid},
                 open_timeout=10, close_timeout=5) as ws:
        ws.send("routed")
        assert ws.recv(timeout=5) == "routed"
    assert live_upstream.record(rid).target == "/echo"
    with pytest.raises(InvalidStatus) as info:
        connect(f"{url}/nowhere/echo", open_timeout=10, close_timeout=5).close()
    assert info.value.response.status_code == 404


# ----------------------------------------------------------------- bad config files


def run_serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dualproxy", "serve", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)


ROUTE = '[[route]]\nmount = "/a"\nupstream = "http://127.0.0.1:9"\n'
TLS_ROUTE = ROUTE.replace("http:", "https:")


@pytest.mark.parametrize(("text", "line", "message"), [
    (ROUTE + '[[route]]\nmount = "/b"\nupstreams = "http://127.0.0.1:9"\n', 6,
     "unknown key 'upstreams' in [[route]] #2 (mount '/b'); did you mean 'upstream'?"),
    (ROUTE + "idle-timeout = 5\n", 4, "unknown key 'idle-timeout' in [[route]] #1 (mount '/a'); "
     "did you mean 'idle_timeout'? (keys are snake_case)"),
    (ROUTE + "timeout = \"5\"\n", 4,
     "'timeout' in [[route]] #1 (mount '/a') must be a number, got a string ('5')"),
    (ROUTE + "preserve_host = 1\n", 4, "'preserve_host' in [[route]] #1 (mount '/a') must be "
     "true or false"),
    (ROUTE + "max_body_size = \"1KB\"\n", 4,
     "bad value for 'max_body_size' in [[route]] #1 (mount '/a'): expected bytes >= 0"),
    (ROUTE + "idle_timeout = -1\n", 4, "bad value for 'idle_timeout' in [[route]] #1 "
     "(mount '/a'): must be a positive number of seconds"),
    (ROUTE + 'trusted_proxies = ["10.0.0.0/8", "nonsense"]\n', 4,
     "[[route]] #1 (mount '/a'): 'nonsense' does not appear to be an IPv4 or IPv6 network"),
    ('[[route]]\nupstream = "ftp://127.0.0.1:9"\n', 2,
     "[[route]] #1 (mount '/'): upstream must be an http(s) URL"),
    (ROUTE + '\n[[route]]\nupstream = "http://127.0.0.1:8"\nmount = "/a/"\n', 7,
     "mount '/a' of [[route]] #2 is already the mount of [[route]] #1"),
    ('[[route]]\nmount = "/a"\ntimeout = 5\n', 1, "[[route]] #1 (mount '/a') has no 'upstream'"),
    ('log_level = "loud"\n' + ROUTE, 1, "bad value for 'log_level' at the top of the file"),
    ('upstreams = "http://127.0.0.1:9"\n' + ROUTE, 1, "unknown key 'upstreams' at the top of "
     "the file; did you mean 'upstream'? (a route option: put it inside a [[route]] table)"),
    ("workers = 2\ntimeout = 5\n" + ROUTE, 2,
     "unknown key 'timeout' at the top of the file (a route option: put it inside a "
     "[[route]] table)"),
    (ROUTE + 'bind = "127.0.0.1:9000"\n', 4, "unknown key 'bind' in [[route]] #1 (mount '/a') "
     "(a server option: put it at the top, before the first [[route]])"),
    (ROUTE + 'timeout = 5\nmount = "/c"\n', 5, "TOML syntax: Cannot overwrite a value"),
    ('bind = "127.0.0.1:9000\n' + ROUTE, 1, "TOML syntax: Illegal character"),
    ("workers = 2\n", None, "no [[route]] table: a config file needs at least one route"),
    (TLS_ROUTE + 'upstream_ca = "/nonexistent/ca.pem"\n', 4, "bad value for 'upstream_ca' in "
     "[[route]] #1 (mount '/a'): cannot read /nonexistent/ca.pem"),
    (TLS_ROUTE + 'upstream_ca = "pyproject.toml"\n', 1, "[[route]] #1 (mount '/a'): cannot "
     "load the CA bundle pyproject.toml"),
    (ROUTE + 'upstream_cert = "pyproject.toml"\n', 3, "[[route]] #1 (mount '/a'): cert "
     "(mutual TLS) needs an https upstream"),
    # accepted once, then every request failed: refused at start now
    ('[[route]]\nupstream = "http://127.0.0.1:9"\nmount = "/日本"\n', 3,
     "must be ASCII without spaces or control characters, as a request target is: "
     "percent-encode it ('/%E6%97%A5%E6%9C%AC')"),
    (ROUTE + "timeout = 1e300\n", 4, "at most 1000000, got 1e+300"),
    (ROUTE + "ws_idle_timeout = 1e7\n", 4, "at most 1000000"),
    ("workers = 100000\n" + ROUTE, 1, "bad value for 'workers' at the top of the file: must be "
     "at most 256"),
    ("threads = 100000\n" + ROUTE, 1, "must be at most 4096"),
    (ROUTE + 'health_path = "/é"\n', 4, "must be ASCII"),
    (ROUTE + 'header_up = ["X-Real-IP: {clinet}"]\n', 4, "[[route]] #1 (mount '/a'): header_up "
     "rule 'X-Real-IP: {clinet}': unknown variable {clinet}"),
    (ROUTE + 'header_down = ["Content-Length: 0"]\n', 4, "content-length cannot be changed"),
    (ROUTE + 'header_up = "X: {request_id}"\n', 4, "uses {request_id}, but request ids are off"),
    (ROUTE + 'request_id = "yes"\n', 4, "'request_id' in [[route]] #1 (mount '/a') must be "
     "true or false"),
    (ROUTE + "forwarded_prefix = 1\n", 4, "'forwarded_prefix' in [[route]] #1 (mount '/a') "
     "must be true or false"),
])
def test_bad_config_files(tmp_path: Path, text: str, line: int | None, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = run_serve("--config", str(path))
    assert result.returncode == 2
    where = f"{path}:{line}: " if line else f"{path}: "
    assert result.stderr.startswith(f"dualproxy serve: error: {where}"), result.stderr
    assert message in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_front_tls_files_of_a_config_file_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "front.toml"
    path.write_text('certfile = "pyproject.toml"\n' + ROUTE)
    result = run_serve("--config", str(path))
    assert (result.returncode, result.stderr) == (
        2, "dualproxy serve: error: --certfile and --keyfile go together\n")


def test_missing_config_file(tmp_path: Path) -> None:
    result = run_serve("--config", str(tmp_path / "none.toml"))
    assert result.returncode == 2
    assert result.stderr == (f"dualproxy serve: error: {tmp_path / 'none.toml'}: cannot read the "
                             "config file: No such file or directory\n")


def test_route_flags_next_to_config_are_a_usage_error() -> None:
    result = run_serve("--config", str(EXAMPLE), "--upstream", "http://127.0.0.1:9",
                       "--max-body-size", "1K")
    assert result.returncode == 2
    assert result.stderr.startswith("dualproxy serve: error: --upstream, --max-body-size "
                                    "cannot be given with --config")
    assert result.stderr.count("\n") == 1


def test_serve_needs_an_upstream_or_a_config() -> None:
    result = run_serve()
    assert result.returncode == 2
    assert "--upstream URL is required, or --config FILE.toml" in result.stderr


def test_the_example_config_is_valid() -> None:
    args, routes = load_config_file(str(EXAMPLE), ["serve", "--config", str(EXAMPLE),
                                                   "--workers", "3"])
    assert [route["mount"] for route in routes] == ["/api", "/files"]
    assert routes[0]["upstream"] == ["http://127.0.0.1:9001/v1", "http://127.0.0.1:9002/v1"]
    assert routes[0]["max_body_size"] == 1 << 20 and routes[1]["idle_timeout"] == 600
    assert (routes[0]["balance"], routes[0]["retries"], routes[0]["health_path"]) == (
        "least-conn", 1, "/health")
    assert args.bind == ("127.0.0.1", 8000) and args.access_log_format == "json"
    assert args.workers == 3  # the command line wins over the file's 2
    json.dumps(routes)  # what the worker processes rebuild the routes from


# ------------------------------------------------------------------- the route table


def test_the_longest_mount_wins_on_segment_boundaries() -> None:
    table = RouteTable(["/api", "/api/v2", "/files", ""])
    assert table.match(b"/api") == 0
    assert table.match(b"/api/x?y=/api/v2") == 0
    assert table.match(b"/api/v2") == 1
    assert table.match(b"/api/v2/x") == 1
    assert table.match(b"/api/v2x") == 0
    assert table.match(b"/apix") == 3
    assert table.match(b"http://h.test/files/a") == 2
    assert RouteTable(["/api", "/files"]).match(b"/") is None
    assert RouteTable(["/api", "/files"]).match(b"/filesx") is None


def test_a_target_longer_than_every_route_takes_is_not_read_by_the_router() -> None:
    """The routing rule reads a path some twenty ways (~1 us a byte of `%`); uvicorn
    passes targets of 64 KB, so a router read each one for 0.12 s before the 414."""
    router = SyncRouter([SyncProxy("http://127.0.0.1:9", mount="/admin", max_target_bytes=100),
                         SyncProxy("http://127.0.0.1:8", max_target_bytes=200)])
    before = path_readings.cache_info().misses
    assert router.route(b"/" + b"%" * 200) is router.proxies[0]  # it answers 414
    assert path_readings.cache_info().misses == before
    assert router.route(b"/admin/" + b"%" * 150) is router.proxies[0]  # read: it agrees
    assert path_readings.cache_info().misses == before + 1


def test_a_mount_given_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="mount '/api' is given twice"):
        RouteTable(["/api", "/x", "/api"])
    with pytest.raises(ValueError, match=r"mount '/a' is given twice \(routes 1 and 2\)"):
        AsyncRouter([AsyncProxy("http://127.0.0.1:9", mount="/a"),
                     AsyncProxy("http://127.0.0.1:9", mount="/a/")])
    with pytest.raises(ValueError, match="mount '/' is given twice"):
        SyncRouter([SyncProxy("http://127.0.0.1:9"), SyncProxy("http://127.0.0.1:8", mount="/")])
    with pytest.raises(ValueError, match="at least one route"):
        RouteTable([])
