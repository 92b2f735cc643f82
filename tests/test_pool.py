"""Several upstreams (DESIGN "Several upstreams, ..."): balancing, health, retries.

Behaviour tests on every pairing: a second recording upstream, closed ports for
dead upstreams, and a tiny raw-socket upstream that reads part of an upload and
then resets (tests/test_balancer.py has the pure balancer and retry decision).
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import MakeProxy, ProxyProcess, free_port
from tests.test_cli import run_cli
from tests.upstream import Upstream

# -- on every pairing ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def second() -> Iterator[Upstream]:
    server = Upstream().start()
    yield server
    server.stop()


def owner(rid: str, *servers: Upstream) -> list[int]:
    """Which of `servers` saw request `rid`, once per sighting."""
    return [i for i, server in enumerate(servers) for _ in server.find_all(rid)]


def get(proxy: ProxyProcess, rid: str, action: str = "echo", **kwargs: object) -> httpx.Response:
    with proxy.client() as client:
        return client.get("/p", headers={"x-req-id": rid, "x-upstream": action},
                          **kwargs)  # type: ignore[arg-type]


def test_round_robin_alternates_with_each_upstreams_host(
        make_proxy: MakeProxy, upstream: Upstream, second: Upstream) -> None:
    proxy = make_proxy("--upstream", second.url, "--balance", "round-robin",
                       "--access-log-format", "json")
    rids = [f"rr-{i}-{time.monotonic_ns()}" for i in range(6)]
    for rid in rids:
        assert get(proxy, rid).status_code == 200
    owners = [owner(rid, upstream, second) for rid in rids]
    assert all(len(o) == 1 for o in owners), owners
    flat = [o[0] for o in owners]
    assert all(a != b for a, b in zip(flat, flat[1:], strict=False)), flat
    servers = (upstream, second)
    for rid, who in zip(rids, flat, strict=True):
        record = servers[who].find(rid)
        assert record is not None
        assert record.header("host") == f"127.0.0.1:{servers[who].port}"
    # The access record names the upstream that served each request.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [json.loads(line) for line in proxy.log().splitlines()
                 if line.startswith("{") and '"target": "/p"' in line]
        if len(lines) >= 6:
            break
        time.sleep(0.05)
    served = {servers[who].url for who in flat}
    assert {line["upstream"] for line in lines[-6:]} == served


def test_least_conn_spreads_concurrent_requests(
        make_proxy: MakeProxy, upstream: Upstream, second: Upstream) -> None:
    proxy = make_proxy("--upstream", second.url)
    rids = [f"lc-{i}-{time.monotonic_ns()}" for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda r: get(proxy, r, "sleep seconds=0.3").status_code,
                                 rids))
    assert statuses == [200] * 8
    owners = [owner(rid, upstream, second) for rid in rids]
    assert all(len(o) == 1 for o in owners), owners
    counts = [sum(o == [i] for o in owners) for i in (0, 1)]
    assert min(counts) >= 2, counts


def test_dead_upstream_gets_and_unsent_posts_served_once(
        make_proxy: MakeProxy, upstream: Upstream) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    # --max-fails 0: the dead one stays in the rotation, so every other request retries.
    proxy = make_proxy("--upstream", dead, "--balance", "round-robin", "--max-fails", "0",
                       upstream_url=upstream.url)
    with proxy.client() as client:
        for i in range(4):
            rid = f"dead-get-{i}-{time.monotonic_ns()}"
            resp = client.get("/x", headers={"x-req-id": rid})
            assert resp.status_code == 200
            assert len(upstream.find_all(rid)) == 1
            rid = f"dead-post-{i}-{time.monotonic_ns()}"
            resp = client.post("/x", headers={"x-req-id": rid}, content=b"b" * 5000)
            assert resp.status_code == 200
            record = upstream.wait_record(rid)
            assert len(upstream.find_all(rid)) == 1
            assert record.body_length == 5000
    log = proxy.log()
    assert "failed (ConnectError" in log and "retrying on http://127.0.0.1:" in log
    assert dead not in log.split("retrying on", 1)[1].split("\n", 1)[0]
    assert "Traceback" not in log


def test_a_failed_upstream_is_skipped_for_fail_timeout(make_proxy: MakeProxy,
                                                       upstream: Upstream) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    proxy = make_proxy("--upstream", upstream.url, "--balance", "round-robin",
                       upstream_url=dead)
    with proxy.client() as client:
        for i in range(6):
            rid = f"skip-{i}-{time.monotonic_ns()}"
            assert client.get("/s", headers={"x-req-id": rid}).status_code == 200
            assert len(upstream.find_all(rid)) == 1
    # Marked down by its first failure (--max-fails 1): tried once, then skipped.
    assert proxy.log().count("retrying on") == 1


class Resetter:
    """A raw upstream: reads a request head and part of its body, then resets (RST)."""

    def __init__(self, keep: int = 16384) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.keep = keep
        self.heads: list[bytes] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                data = b""
                try:
                    while b"\r\n\r\n" not in data or len(data) < self.keep:
                        piece = conn.recv(65536)
                        if not piece:
                            break
                        data += piece
                except OSError:
                    pass
                self.heads.append(data.split(b"\r\n\r\n", 1)[0])
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                b"\x01\x00\x00\x00\x00\x00\x00\x00")

    def saw(self, rid: str) -> bool:
        return any(rid.encode() in head for head in self.heads)

    def stop(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def resetter() -> Iterator[Resetter]:
    server = Resetter()
    yield server
    server.stop()


def test_a_cut_upload_is_never_resent(make_proxy: MakeProxy, upstream: Upstream,
                                      resetter: Resetter) -> None:
    proxy = make_proxy("--upstream", resetter.url, "--balance", "round-robin",
                       "--max-fails", "0", upstream_url=upstream.url)
    cut = 0
    with proxy.client() as client:
        for i in range(4):
            rid = f"cut-{i}-{time.monotonic_ns()}"
            try:
                resp = client.post("/x", headers={"x-req-id": rid}, content=b"u" * 200_000)
                status = resp.status_code
            except httpx.TransportError:  # the proxy may close while we still upload
                status = 0
            if resetter.saw(rid):
                cut += 1
                assert status in (0, 502)
                if status:
                    assert resp.headers["content-type"].startswith("application/problem+json")
                assert upstream.find_all(rid) == [], "a cut upload was resent"
            else:
                assert status == 200 and len(upstream.find_all(rid)) == 1
    assert cut >= 1


def test_all_upstreams_down_is_502_naming_no_address(make_proxy: MakeProxy) -> None:
    ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    proxy = make_proxy("--upstream", urls[1], upstream_url=urls[0])
    details = []
    for i in range(3):
        resp = get(proxy, f"down-{i}")
        assert resp.status_code == 502
        assert resp.headers["content-type"].startswith("application/problem+json")
        assert "127.0.0.1" not in resp.text
        assert all(str(port) not in resp.text for port in ports)
        details.append(resp.json()["detail"])
    # Both failed on the first request and are marked down; marks are a preference,
    # never a blackout: each later request tries them again and says why they failed.
    assert details == ["the upstream refused or could not be reached"] * 3
    assert proxy.log().count("retrying on") == 3
    assert proxy.alive()


def test_one_slow_request_never_blacks_out_the_pool(make_proxy: MakeProxy, upstream: Upstream,
                                                    second: Upstream) -> None:
    """Two healthy upstreams, --timeout 1: a GET taking 3 s times out on one, is retried
    on the other and times out there too (504); both are marked down, and still the
    next requests are served at once (not 502 "no upstream is available" for
    --fail-timeout)."""
    proxy = make_proxy("--upstream", second.url, "--timeout", "1", "--fail-timeout", "60",
                       upstream_url=upstream.url)
    rid = f"slow-{time.monotonic_ns()}"
    slow = get(proxy, rid, "sleep seconds=3")
    assert slow.status_code == 504, slow.text
    assert sorted(owner(rid, upstream, second)) == [0, 1]  # tried on both
    for i in range(4):
        rid = f"after-slow-{i}-{time.monotonic_ns()}"
        resp = get(proxy, rid)
        assert resp.status_code == 200, resp.text
        assert len(owner(rid, upstream, second)) == 1
    assert proxy.alive()


def test_active_health_brings_an_upstream_back(make_proxy: MakeProxy,
                                               upstream: Upstream) -> None:
    port = free_port()
    # --fail-timeout 60: only a passing probe can end the passive mark in time.
    proxy = make_proxy("--upstream", f"http://127.0.0.1:{port}", "--health-path", "/healthz",
                       "--health-interval", "0.5", "--fail-timeout", "60",
                       upstream_url=upstream.url)
    for i in range(3):
        assert get(proxy, f"before-{i}-{time.monotonic_ns()}").status_code == 200
    late = Upstream(port=port).start()
    try:
        deadline = time.monotonic() + 15
        served = False
        while time.monotonic() < deadline and not served:
            rid = f"back-{time.monotonic_ns()}"
            assert get(proxy, rid).status_code == 200
            served = late.find(rid) is not None
            time.sleep(0.1)
        assert served, proxy.log()[-2000:]
        probes = [r for r in late.records if r.target == b"/healthz"]
        assert probes and probes[0].header("host") == f"127.0.0.1:{port}"
        # Coming back is good news (INFO); going down stays a WARNING.
        assert re.search(rf"INFO \[\d+\] dualproxy: upstream http://127.0.0.1:{port} is up "
                         "again", proxy.log()), proxy.log()[-2000:]
    finally:
        late.stop()


def test_redirects_from_any_upstream_of_the_pool_are_rewritten(
        make_proxy: MakeProxy, upstream: Upstream, second: Upstream) -> None:
    proxy = make_proxy("--upstream", second.url, "--mount", "/api")
    with proxy.client() as client:
        for target in (upstream, second):
            for i in range(2):  # least-conn alternates: each upstream answers once
                resp = client.get("/api/x", headers={
                    "x-req-id": f"redir-{i}-{time.monotonic_ns()}",
                    "x-upstream": f"status code=302 location={target.url}/moved?q=1"})
                assert resp.status_code == 302
                assert resp.headers["location"] == "/api/moved?q=1"


# -- the Python API and the CLI -----------------------------------------------------------

def test_python_api_takes_a_list_on_both_faces(upstream: Upstream) -> None:
    from dualproxy import AsyncProxy, SyncProxy

    dead = f"http://127.0.0.1:{free_port()}"
    sync = SyncProxy([dead, upstream.url], balance="round-robin", retries=1,
                     access_log=False)
    assert [u.url for u in sync.config.upstreams] == [dead, upstream.url]
    with httpx.Client(transport=httpx.WSGITransport(app=sync), base_url="http://front") as c:
        statuses = [c.get("/", headers={"x-req-id": f"api-sync-{i}"}).status_code
                    for i in range(4)]
    sync.close()
    assert statuses == [200] * 4
    assert all(len(upstream.find_all(f"api-sync-{i}")) == 1 for i in range(4))

    async def run() -> list[int]:
        proxy = AsyncProxy([dead, upstream.url], balance="random", retries=1,
                           access_log=False)
        transport = httpx.ASGITransport(app=proxy)
        async with httpx.AsyncClient(transport=transport, base_url="http://front") as client:
            got = [(await client.get("/", headers={"x-req-id": f"api-async-{i}"})).status_code
                   for i in range(4)]
        await proxy.aclose()
        return got

    assert asyncio.run(run()) == [200] * 4
    assert all(len(upstream.find_all(f"api-async-{i}")) == 1 for i in range(4))
    with pytest.raises(ValueError, match="balance must be one of"):
        SyncProxy([upstream.url], balance="fastest")


def test_websocket_handshake_retried_on_another_upstream(make_proxy: MakeProxy) -> None:
    from tests.test_websocket import open_ws
    from tests.ws_upstream import WsUpstream

    dead = f"http://127.0.0.1:{free_port()}"
    ws_upstream = WsUpstream().start()
    try:
        proxy = make_proxy("--upstream", ws_upstream.url, "--balance", "round-robin",
                           "--max-fails", "0", upstream_url=dead)
        for i in range(4):
            rid = f"ws-pool-{i}-{time.monotonic_ns()}"
            with open_ws(proxy, rid=rid) as ws:
                ws.send(f"hello {i}")
                assert ws.recv(timeout=5) == f"hello {i}"
            record = ws_upstream.record(rid)
            assert record.header("host") == [ws_upstream.url.removeprefix("http://")]
        log = proxy.log()
        assert "failed (ConnectionRefusedError" in log or "failed (ConnectError" in log, log
        assert "retrying on " + ws_upstream.url in log
    finally:
        ws_upstream.stop()


def test_pool_keys_in_a_config_file(tmp_path: Path) -> None:
    from dualproxy.cli import check_route, load_config_file

    path = tmp_path / "pool.toml"
    path.write_text('[[route]]\nmount = "/a"\nupstream = ["http://127.0.0.1:9", '
                    '"http://127.0.0.1:8"]\nbalance = "round-robin"\nmax_fails = 3\n'
                    'fail_timeout = 2.5\nretries = 0\nhealth_path = "/healthz"\n'
                    'health_interval = 1\n')
    _, routes = load_config_file(str(path), ["serve", "--config", str(path)])
    config = check_route(routes[0])
    assert (config.balance, config.max_fails, config.fail_timeout, config.retries,
            config.health_path, config.health_interval) == (
                "round-robin", 3, 2.5, 0, "/healthz", 1.0)
    assert len(config.upstreams) == 2
    path.write_text('[[route]]\nupstream = "http://127.0.0.1:9"\nretries = -1\n')
    result = run_cli("serve", "--config", str(path))
    assert result.returncode == 2
    assert f"{path}:3: bad value for 'retries'" in result.stderr


def test_a_pool_of_a_unix_socket_and_tcp_with_each_ones_host(
        make_proxy: MakeProxy, upstream: Upstream, unix_upstream: Upstream) -> None:
    proxy = make_proxy("--upstream", unix_upstream.url, "--balance", "round-robin",
                       "--health-path", "/healthz", "--health-interval", "0.5")
    rids = [f"mixed-{i}-{time.monotonic_ns()}" for i in range(4)]
    with proxy.client() as client:
        assert [client.get("/m", headers={"x-req-id": rid}).status_code
                for rid in rids] == [200] * 4
    hosts = sorted(r.header("host") or "" for server in (upstream, unix_upstream)
                   for rid in rids for r in server.find_all(rid))
    assert hosts == sorted(["localhost"] * 2 + [f"127.0.0.1:{upstream.port}"] * 2)
    # Probes reach the unix socket through the proxy's own transport.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(
            r.target == b"/healthz" for r in unix_upstream.records):
        time.sleep(0.1)
    assert any(r.target == b"/healthz" for r in unix_upstream.records)
