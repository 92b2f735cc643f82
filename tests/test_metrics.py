"""Prometheus metrics: `serve --metrics-bind` on every pairing, and the Python API.

Counts are compared as differences between two scrapes of the proxy's metrics
listener (the suite's readiness probe is a request too), parsed with
prometheus_client's own parser; a scrape waits until nothing is in flight, so
every request of the mix has been counted.
"""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect

from dualproxy import AsyncProxy, SyncProxy
from dualproxy.errors import (
    BadGateway,
    BadRequest,
    GatewayTimeout,
    ServiceUnavailable,
    UpstreamBroken,
    upstream_cause,
)
from tests.conftest import MakeProxy, ProxyPool, ProxyProcess, free_port
from tests.rawhttp import connect as raw_connect
from tests.rawhttp import wait_until
from tests.upstream import Upstream
from tests.ws_upstream import WsUpstream

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
IN_FLIGHT = "dualproxy_requests_in_flight"


def parse(text: str) -> Samples:
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


class Scraper:
    """The metrics listener of one proxy process."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"

    def scrape(self) -> Samples:
        answer = httpx.get(self.url + "/metrics", timeout=10)
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/plain")
        return parse(answer.text)

    def settled(self) -> Samples:
        """A scrape once no request is in flight (the last access record is written)."""
        assert wait_until(lambda: value(self.scrape(), IN_FLIGHT) == 0)
        return self.scrape()


def with_metrics(make_proxy: MakeProxy, *flags: str, **where: str
                 ) -> tuple[ProxyProcess, Scraper]:
    port = free_port()
    proxy = make_proxy(*flags, "--metrics-bind", f"127.0.0.1:{port}", **where)
    return proxy, Scraper(port)


def test_counts_after_a_scripted_mix(make_proxy: MakeProxy, rid: str) -> None:
    proxy, metrics = with_metrics(make_proxy)
    assert httpx.get(metrics.url + "/healthz").text == "ok\n"
    before = metrics.settled()
    with proxy.client() as client:
        for _ in range(3):
            got = client.get(f"/mix/{rid}", headers={"x-upstream": "download size=1000"})
            assert (got.status_code, len(got.content)) == (200, 1000)
        for size in (1234, 4321):
            sent = client.post(f"/mix/{rid}", content=b"u" * size,
                               headers={"x-upstream": "status code=200 body=ok"})
            assert (sent.status_code, sent.content) == (200, b"ok")
        missing = client.get(f"/mix/{rid}", headers={"x-upstream": "status code=404 body=nope"})
        assert missing.status_code == 404
        assert client.get(f"/mix/%00{rid}").status_code == 400  # refused by the core
        with pytest.raises(httpx.TransportError):  # 500 of 1000 bytes, then the upstream closes
            client.get(f"/mix/{rid}", headers={"x-upstream": "cut size=1000 after=500"})
    after = metrics.settled()

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    requests = "dualproxy_requests_total"
    assert delta(requests, route="/", method="GET", status_class="2xx") == 4  # the cut one too
    assert delta(requests, route="/", method="POST", status_class="2xx") == 2
    assert delta(requests, route="/", method="GET", status_class="4xx") == 2
    assert sum(v for (name, _), v in after.items() if name == requests) \
        - sum(v for (name, _), v in before.items() if name == requests) == 8
    assert delta("dualproxy_request_bytes_total", route="/") == 1234 + 4321
    assert delta("dualproxy_response_bytes_total", route="/") == 3 * 1000 + 2 * 2 + 4 + 500
    assert delta("dualproxy_upstream_head_seconds_count", route="/") == 7
    assert delta("dualproxy_upstream_errors_total", route="/", cause="cut_body") == 1
    for cause in ("refused", "timeout", "other"):
        assert delta("dualproxy_upstream_errors_total", route="/", cause=cause) == 0
    assert value(after, IN_FLIGHT) == 0
    upstream_label = {"upstream": proxy_upstream(proxy)}
    assert value(after, "dualproxy_upstream_up", **upstream_label) == 1
    assert value(after, "dualproxy_pool_connections_in_use", **upstream_label) == 0


def proxy_upstream(proxy: ProxyProcess) -> str:
    args = proxy.proc.args
    assert isinstance(args, list)
    return str(args[args.index("--upstream") + 1])


def test_refused_upstream_counts_a_502_and_its_cause(make_proxy: MakeProxy, rid: str) -> None:
    dead, metrics = with_metrics(make_proxy, upstream_url=f"http://127.0.0.1:{free_port()}")
    before = metrics.settled()
    assert httpx.get(dead.url + f"/gone/{rid}").status_code == 502
    after = metrics.settled()
    for name, labels, change in (
            ("dualproxy_requests_total", {"method": "GET", "status_class": "5xx"}, 1),
            ("dualproxy_upstream_errors_total", {"cause": "refused"}, 1),
            ("dualproxy_upstream_head_seconds_count", {}, 0)):
        labels["route"] = "/"
        assert value(after, name, **labels) - value(before, name, **labels) == change, name


def test_a_pool_reports_each_upstreams_health(make_proxy: MakeProxy, upstream: Upstream,
                                             rid: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    proxy, metrics = with_metrics(make_proxy, "--upstream", dead, "--balance", "round-robin")
    with proxy.client() as client:
        for i in range(4):  # the dead one is tried once, marked down, retried elsewhere
            assert client.get(f"/pool/{rid}/{i}").status_code == 200
    after = metrics.settled()
    assert value(after, "dualproxy_upstream_up", upstream=dead) == 0
    assert value(after, "dualproxy_upstream_up", upstream=upstream.url) == 1
    for label in (dead, upstream.url):
        assert value(after, "dualproxy_pool_connections_in_use", upstream=label) == 0
    assert value(after, "dualproxy_upstream_errors_total", route="/", cause="refused") == 0


def test_two_workers_are_summed_and_metrics_stay_off_the_proxied_port(
        make_proxy: MakeProxy, upstream: Upstream, rid: str) -> None:
    proxy, metrics = with_metrics(make_proxy, "--workers", "2")
    before = metrics.settled()
    # /metrics and /healthz on the proxied port are the upstream's paths like any other.
    for path in ("/metrics", "/healthz"):
        answer = httpx.get(proxy.url + path, headers={"x-req-id": f"{rid}{path}"})
        assert answer.status_code == 200 and answer.json()["target"] == path
        assert upstream.wait_record(f"{rid}{path}") is not None
    made = 2
    # Each request on a new connection, until the access lines show both workers served.
    for _ in range(200):
        assert httpx.get(proxy.url + f"/w/{rid}").status_code == 200
        made += 1
        if made >= 10 and len(_serving_pids(proxy, rid)) == 2:
            break
    assert len(_serving_pids(proxy, rid)) == 2, proxy.log()
    after = metrics.settled()
    labels = {"route": "/", "method": "GET", "status_class": "2xx"}
    name = "dualproxy_requests_total"
    assert value(after, name, **labels) - value(before, name, **labels) == made
    assert value(after, "dualproxy_upstream_up", upstream=proxy_upstream(proxy)) == 1


def _serving_pids(proxy: ProxyProcess, rid: str) -> set[str]:
    return set(re.findall(rf"\[(\d+)\] dualproxy\.access: GET /w/{rid} 200", proxy.log()))


def test_a_killed_worker_leaves_the_in_flight_sum(make_proxy: MakeProxy, rid: str) -> None:
    """gunicorn's child_exit, or the scrape's check of uvicorn's workers, drops its share."""
    proxy, metrics = with_metrics(make_proxy, "--workers", "2")
    metrics.settled()
    with ThreadPoolExecutor(1) as pool:
        hanging = pool.submit(httpx.get, proxy.url + f"/hang/{rid}", timeout=30,
                              headers={"x-upstream": "hang seconds=30"})
        assert wait_until(lambda: value(metrics.scrape(), IN_FLIGHT) == 1)
        workers = subprocess.run(["pgrep", "-P", str(proxy.proc.pid)], capture_output=True,
                                 text=True, timeout=10).stdout.split()
        assert workers
        for pid in workers:
            os.kill(int(pid), signal.SIGKILL)
        with pytest.raises(httpx.TransportError):
            hanging.result(timeout=30)
    assert wait_until(lambda: value(metrics.scrape(), IN_FLIGHT) == 0)
    assert wait_until(lambda: _answers(proxy), timeout=20)  # the server replaced them
    assert value(metrics.settled(), IN_FLIGHT) == 0


def _answers(proxy: ProxyProcess) -> bool:
    try:
        return httpx.get(proxy.url + "/again", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def test_config_file_routes_count_by_mount(pairing: str, proxy_pool: ProxyPool,
                                           upstream: Upstream, tmp_path: Path,
                                           rid: str) -> None:
    """`metrics_bind` as a config-file server key; each route's mount is its `route`."""
    port = free_port()
    path = tmp_path / "routes.toml"
    path.write_text(f"""metrics_bind = "127.0.0.1:{port}"

[[route]]
mount = "/"
upstream = "{upstream.url}"

[[route]]
mount = "/b"
upstream = "{upstream.url}"
""")
    proxy = proxy_pool.get(pairing, "", ("--config", str(path)))
    metrics = Scraper(port)
    before = metrics.settled()
    for target in ("/a/1", "/a/2", "/b/1"):
        assert httpx.get(proxy.url + f"{target}/{rid}").status_code == 200
    after = metrics.settled()
    name = "dualproxy_requests_total"
    for route, count in (("/", 2), ("/b", 1)):
        labels = {"route": route, "method": "GET", "status_class": "2xx"}
        assert value(after, name, **labels) - value(before, name, **labels) == count, route


@pytest.fixture(scope="session")
def ws_upstream() -> Iterator[WsUpstream]:
    server = WsUpstream().start()
    yield server
    server.stop()


def test_websocket_sessions_gauge(make_proxy: MakeProxy, ws_upstream: WsUpstream) -> None:
    proxy, metrics = with_metrics(make_proxy, upstream_url=ws_upstream.url)
    before = metrics.settled()
    sessions = "dualproxy_websocket_sessions"
    with connect(f"ws://127.0.0.1:{proxy.port}/echo", open_timeout=10, close_timeout=5) as ws:
        ws.send("hello")
        assert ws.recv(timeout=5) == "hello"
        open_now = metrics.scrape()
        assert (value(open_now, sessions), value(open_now, IN_FLIGHT)) == (1, 1)
    after = metrics.settled()
    assert value(after, sessions) == 0
    labels = {"route": "/", "method": "GET", "status_class": "1xx"}
    name = "dualproxy_requests_total"
    assert value(after, name, **labels) - value(before, name, **labels) == 1


def _serve(*flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dualproxy", "serve", "--upstream",
                           "http://127.0.0.1:9", *flags], capture_output=True, text=True,
                          timeout=30)


def test_idle_connections_hold_no_threads(make_proxy: MakeProxy) -> None:
    """300 connections to --metrics-bind that never send a byte: the listener's process
    keeps a bounded number of threads (a thread per connection made 306) and /metrics
    still answers while they stay open."""
    proxy, metrics = with_metrics(make_proxy)
    port = int(metrics.url.rsplit(":", 1)[1])
    tasks = f"/proc/{proxy.proc.pid}/task"
    assert metrics.scrape()
    before = len(os.listdir(tasks))
    idle = []
    try:
        for _ in range(300):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        # Accepted in order: once this scrape is answered, every idle one was accepted.
        assert metrics.scrape()
        assert len(os.listdir(tasks)) <= before + 8, len(os.listdir(tasks))
        assert httpx.get(metrics.url + "/healthz", timeout=10).text == "ok\n"
    finally:
        for sock in idle:
            sock.close()



@pytest.mark.parametrize("bind", ["nope", "127.0.0.1:0", "127.0.0.1:70000", "127.0.0.1:8000"])
def test_bad_metrics_bind_exits_2(bind: str) -> None:
    done = _serve("--bind", "127.0.0.1:8000", "--metrics-bind", bind)
    assert done.returncode == 2 and "--metrics-bind" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_metrics_bind_without_prometheus_client_exits_2() -> None:
    code = ("import sys; sys.modules['prometheus_client'] = None; from dualproxy.cli import main;"
            "sys.exit(main(['serve', '--upstream', 'http://127.0.0.1:9', '--metrics-bind',"
            "'127.0.0.1:9100']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 2 and "dualproxy[metrics]" in done.stderr


def test_metrics_port_taken_exits_1() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _serve("--bind", f"127.0.0.1:{free_port()}", "--metrics-bind",
                      f"127.0.0.1:{port}")
    assert done.returncode == 1 and "--metrics-bind" in done.stderr
    assert "Traceback" not in done.stderr


def test_duration_aborts_and_no_unrouted_series(make_proxy: MakeProxy, rid: str) -> None:
    """A total-duration histogram per route; a client that leaves counts as a client
    abort, never as an upstream error; a request outside the mount adds no series but
    `requests_total{route="none"}`."""
    proxy, metrics = with_metrics(make_proxy, "--mount", "/api")
    before = metrics.settled()
    with proxy.client() as client:
        assert client.get(f"/api/d/{rid}").status_code == 200
        assert client.get(f"/outside/{rid}").status_code == 404
    with raw_connect(proxy.port) as sock:  # leaves in the middle of the download
        sock.sendall(f"GET /api/gone/{rid} HTTP/1.1\r\nHost: a\r\nx-req-id: {rid}\r\n"
                     "x-upstream: trickle size=100000 interval=0.05 chunk=1000\r\n\r\n"
                     .encode())
        assert sock.recv(4096)
    after = metrics.settled()  # once the proxy has seen the client leave

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("dualproxy_request_duration_seconds_count", route="/api") == 2
    assert delta("dualproxy_client_aborts_total", route="/api") == 1
    assert sum(v for (name, _), v in after.items()
               if name == "dualproxy_upstream_errors_total") == 0
    unrouted = {name for (name, labels), _ in after.items() if ("route", "none") in labels}
    assert "dualproxy_requests_total" in unrouted
    assert unrouted <= {"dualproxy_requests_total", "dualproxy_requests_created"}, unrouted


# -- the Python API, in process, on a private registry -------------------------------------


def test_api_counts_on_a_private_registry(upstream: Upstream, rid: str) -> None:
    registry = CollectorRegistry()
    sync = SyncProxy(upstream.url, mount="/api", metrics=registry)
    with httpx.Client(transport=httpx.WSGITransport(app=sync), base_url="http://app") as client:
        assert client.post(f"/api/{rid}", content=b"x" * 10,
                           headers={"x-upstream": "download size=7"}).status_code == 200
        assert client.get("/elsewhere").status_code == 404
        assert client.request("BREW", f"/api/{rid}").status_code == 200
    sync.close()
    # A second proxy on the same registry shares its metrics (no duplicate series).
    other = AsyncProxy(upstream.url, metrics=registry)

    def get(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert get("dualproxy_requests_total", route="/api", method="POST", status_class="2xx") == 1
    assert get("dualproxy_requests_total", route="none", method="GET", status_class="4xx") == 1
    assert get("dualproxy_requests_total", route="/api", method="other",
               status_class="2xx") == 1
    assert get("dualproxy_request_bytes_total", route="/api") == 10
    assert get("dualproxy_upstream_head_seconds_count", route="/api") == 2
    assert get("dualproxy_request_duration_seconds_count", route="/api") == 2
    assert get("dualproxy_requests_in_flight") == 0
    assert get("dualproxy_upstream_up", upstream=str(other.config.upstreams[0])) == 1
    assert other.metrics is sync.metrics


def test_api_pool_gauge_counts_a_response_in_progress(upstream: Upstream, rid: str) -> None:
    registry = CollectorRegistry()
    proxy = SyncProxy(upstream.url, metrics=registry)
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": f"/pool/{rid}", "SERVER_PROTOCOL": "HTTP/1.1",
               "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(), "REMOTE_ADDR": "127.0.0.1",
               "HTTP_HOST": "app", "HTTP_X_UPSTREAM": "download size=100000"}
    body = proxy(environ, lambda status, headers, exc_info=None: lambda data: None)
    label = {"upstream": str(proxy.config.upstreams[0])}
    try:  # the head is in, the body not read: its connection is taken
        assert registry.get_sample_value("dualproxy_pool_connections_in_use", label) == 1
        assert registry.get_sample_value("dualproxy_requests_in_flight") == 1
    finally:
        body.close()  # type: ignore[attr-defined]
    assert registry.get_sample_value("dualproxy_pool_connections_in_use", label) == 0
    assert registry.get_sample_value("dualproxy_requests_in_flight") == 0
    proxy.close()


def test_metrics_off_imports_no_prometheus_client(upstream: Upstream) -> None:
    code = ("import sys, dualproxy; dualproxy.SyncProxy(sys.argv[1]); dualproxy.AsyncProxy("
            "sys.argv[1]); print('prometheus_client' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, upstream.url], capture_output=True,
                         text=True, timeout=30, check=True).stdout.strip()
    assert out == "False"


def _caused(exc: BaseException, cause: BaseException | None) -> BaseException:
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize(("exc", "cause"), [
    (_caused(BadGateway("x"), httpx.ConnectError("refused")), "refused"),
    (_caused(BadGateway("x"), ConnectionRefusedError()), "refused"),
    (_caused(GatewayTimeout("x"), httpx.ReadTimeout("slow")), "timeout"),
    (_caused(ServiceUnavailable("x"), httpx.PoolTimeout("full")), "timeout"),
    (_caused(BadGateway("x"), httpx.RemoteProtocolError("bad")), "other"),
    (_caused(UpstreamBroken("x"), httpx.ReadTimeout("idle")), "timeout"),
    (_caused(UpstreamBroken("x"), httpx.RemoteProtocolError("cut")), "cut_body"),
    (BadRequest("x"), None),
    (ValueError("x"), None),
])
def test_upstream_cause(exc: BaseException, cause: str | None) -> None:
    assert upstream_cause(exc) == cause
