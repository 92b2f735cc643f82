"""TLS both sides, on every pairing: https upstreams (private CA, refused without it,
--upstream-insecure, mutual TLS), wss upstreams, and the proxy serving HTTPS.

The CA and every certificate are made by the tests (trustme, `tls_files` in
conftest); the upstreams are the suite's recording ones served with TLS.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Iterator

import httpx
import pytest
from websockets.sync.client import connect

from dualproxy import AsyncProxy, SyncProxy
from tests.conftest import MakeProxy, TLSFiles, assert_reused, transfer_hashed
from tests.test_cli import UPSTREAM, run_cli
from tests.upstream import Upstream
from tests.ws_upstream import WsUpstream

pytestmark = pytest.mark.pairings

MiB = 1 << 20


def trusting(tls_files: TLSFiles) -> tuple[str, ...]:
    return ("--upstream-ca", tls_files.ca_pem)


def problem(resp_text: str) -> dict[str, object]:
    doc: dict[str, object] = json.loads(resp_text)
    return doc


# ------------------------------------------------------------------ https upstreams


def test_https_upstream_with_private_ca(make_proxy: MakeProxy, https_upstream: Upstream,
                                        tls_files: TLSFiles, rid: str) -> None:
    proxy = make_proxy(*trusting(tls_files), upstream_url=https_upstream.url)
    with proxy.client() as client:
        resp = client.get("/a?b=1", headers={"x-req-id": rid})
    assert resp.status_code == 200, resp.text
    rec = https_upstream.wait_record(rid)
    assert rec.target == b"/a?b=1"
    assert rec.header("host") == f"127.0.0.1:{https_upstream.port}"
    transfer_hashed(proxy, https_upstream, 5 * MiB)


def test_tls_connections_are_reused(make_proxy: MakeProxy, https_upstream: Upstream,
                                    tls_files: TLSFiles) -> None:
    proxy = make_proxy(*trusting(tls_files), upstream_url=https_upstream.url)
    assert_reused(proxy, https_upstream)  # no new TLS handshake per request


@pytest.mark.parametrize("ca", ["system", "other"])
def test_unverified_upstream_is_a_502_problem(make_proxy: MakeProxy, https_upstream: Upstream,
                                              tls_files: TLSFiles, ca: str, rid: str) -> None:
    flags = () if ca == "system" else ("--upstream-ca", tls_files.other_ca_pem)
    proxy = make_proxy(*flags, upstream_url=https_upstream.url)
    with proxy.client() as client:
        resp = client.get("/x", headers={"x-req-id": rid})
    assert resp.status_code == 502
    assert resp.headers["content-type"] == "application/problem+json"
    detail = str(problem(resp.text)["detail"])
    assert detail.startswith("TLS verification of the upstream failed"), detail
    port = https_upstream.url.rsplit(":", 1)[1]
    assert port not in detail and "127.0.0.1" not in detail  # the address is for the log
    assert https_upstream.find(rid) is None
    assert "Traceback" not in proxy.log()


def test_insecure_skips_verification_and_warns(make_proxy: MakeProxy,
                                               https_upstream: Upstream, rid: str) -> None:
    proxy = make_proxy("--upstream-insecure", upstream_url=https_upstream.url)
    with proxy.client() as client:
        resp = client.get("/x", headers={"x-req-id": rid})
    assert resp.status_code == 200, resp.text
    assert https_upstream.wait_record(rid).method == "GET"
    warnings = [line for line in proxy.log().splitlines()
                if " WARNING " in line and "--upstream-insecure" in line]
    assert warnings and "NOT verified" in warnings[0], proxy.log()


def test_mutual_tls(make_proxy: MakeProxy, mtls_upstream: Upstream, tls_files: TLSFiles,
                    rid: str) -> None:
    without = make_proxy(*trusting(tls_files), upstream_url=mtls_upstream.url)
    with without.client() as client:
        refused = client.get("/x", headers={"x-req-id": rid + "-no"})
    assert refused.status_code == 502
    assert refused.headers["content-type"] == "application/problem+json"
    assert mtls_upstream.find(rid + "-no") is None

    proxy = make_proxy(*trusting(tls_files), "--upstream-cert", tls_files.client_cert,
                       "--upstream-key", tls_files.client_key, upstream_url=mtls_upstream.url)
    with proxy.client() as client:
        resp = client.get("/x", headers={"x-req-id": rid})
    assert resp.status_code == 200, resp.text
    assert mtls_upstream.wait_record(rid).method == "GET"


# ------------------------------------------------------------------ the proxy serving HTTPS


def test_proxy_serves_https(make_proxy: MakeProxy, upstream: Upstream, tls_files: TLSFiles,
                            rid: str) -> None:
    proxy = make_proxy("--certfile", tls_files.server_cert, "--keyfile", tls_files.server_key)
    assert proxy.url.startswith("https://")
    with proxy.client(verify=tls_files.client_context()) as client:
        resp = client.get("/front", headers={"x-req-id": rid})
    assert resp.status_code == 200, resp.text
    rec = upstream.wait_record(rid)
    assert rec.header("x-forwarded-proto") == "https"
    assert str(rec.header("forwarded")).endswith(";proto=https")
    transfer_hashed(proxy, upstream, 2 * MiB, verify=tls_files.client_context())


# ------------------------------------------------------------------ WebSocket over TLS


@pytest.fixture(scope="session")
def wss_upstream(tls_files: TLSFiles) -> Iterator[WsUpstream]:
    server = WsUpstream(ssl=tls_files.server_context()).start()
    yield server
    server.stop()


def test_websocket_to_a_wss_upstream(make_proxy: MakeProxy, wss_upstream: WsUpstream,
                                     tls_files: TLSFiles, rid: str) -> None:
    proxy = make_proxy(*trusting(tls_files), upstream_url=wss_upstream.url)
    with connect(f"ws://127.0.0.1:{proxy.port}/echo", additional_headers={"x-req-id": rid},
                 open_timeout=10, close_timeout=5) as ws:
        ws.send("over tls")
        assert ws.recv(timeout=5) == "over tls"
        ws.send(b"\x00\x01" * 40000)
        assert ws.recv(timeout=5) == b"\x00\x01" * 40000
    assert wss_upstream.record(rid).target == "/echo"


def test_wss_on_both_sides(make_proxy: MakeProxy, wss_upstream: WsUpstream,
                           tls_files: TLSFiles, rid: str) -> None:
    proxy = make_proxy(*trusting(tls_files), "--certfile", tls_files.server_cert,
                       "--keyfile", tls_files.server_key, upstream_url=wss_upstream.url)
    with connect(f"wss://127.0.0.1:{proxy.port}/echo", additional_headers={"x-req-id": rid},
                 ssl=tls_files.client_context(), open_timeout=10, close_timeout=5) as ws:
        for message in ("tls twice", b"\x07" * 300_000):
            ws.send(message)
            assert ws.recv(timeout=5) == message
    record = wss_upstream.record(rid)
    assert record.header("x-forwarded-proto") == ["https"]


def test_websocket_unverified_wss_is_refused(make_proxy: MakeProxy, wss_upstream: WsUpstream,
                                             rid: str) -> None:
    proxy = make_proxy(upstream_url=wss_upstream.url)
    with pytest.raises(Exception) as info:
        connect(f"ws://127.0.0.1:{proxy.port}/echo", additional_headers={"x-req-id": rid},
                open_timeout=10).close()
    response = getattr(info.value, "response", None)
    assert response is not None and response.status_code == 502, info.value
    assert rid not in wss_upstream.records


# ------------------------------------------------------------------ usage errors


@pytest.mark.parametrize(("flags", "names"), [
    (["--upstream-ca", "/nonexistent/ca.pem"], "/nonexistent/ca.pem"),
    (["--upstream-cert", "/nonexistent/c.pem"], "/nonexistent/c.pem"),
    (["--certfile", "/nonexistent/s.pem", "--keyfile", "/nonexistent/s.pem"],
     "/nonexistent/s.pem"),
    (["--upstream-key", "{key}"], "--upstream-key needs --upstream-cert"),
    (["--upstream-cert", "{cert}"], "https upstream"),
    (["--upstream-ca", "{ca}", "--upstream-insecure"], "--upstream-insecure"),
    (["--certfile", "{cert}"], "--certfile and --keyfile"),
    (["--keyfile", "{key}"], "--certfile and --keyfile"),
    (["--certfile", "{ca}", "--keyfile", "{ca}"], "--certfile"),
])
def test_tls_flag_usage_errors(flags: list[str], names: str, tls_files: TLSFiles) -> None:
    files = {"ca": tls_files.ca_pem, "cert": tls_files.client_cert,
             "key": tls_files.client_key}
    flags = [flag.format(**files) for flag in flags]
    result = run_cli("serve", "--upstream", UPSTREAM, "--bind", "127.0.0.1:1", *flags)
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dualproxy serve: error: ") and names in lines[0], lines


def test_bad_ca_bundle_names_the_file(tls_files: TLSFiles) -> None:
    result = run_cli("serve", "--upstream", "https://127.0.0.1:9", "--bind", "127.0.0.1:1",
                     "--upstream-ca", tls_files.client_key)
    assert result.returncode == 2, result
    assert len(result.stderr.splitlines()) == 1
    assert tls_files.client_key in result.stderr


# ------------------------------------------------------------------ the Python API


def wsgi_get(proxy: SyncProxy, path: str, **headers: str) -> httpx.Response:
    """GET through a SyncProxy in this process, then close it."""
    try:
        with httpx.Client(transport=httpx.WSGITransport(app=proxy), base_url="http://f") as c:
            return c.get(path, headers=headers)
    finally:
        proxy.close()


def asgi_get(proxy: AsyncProxy, path: str) -> httpx.Response:
    """GET through an AsyncProxy in this process, then close it."""

    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=proxy)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://f") as c:
                return await c.get(path)
        finally:
            await proxy.aclose()

    return asyncio.run(run())


def test_python_api_takes_httpx_names(https_upstream: Upstream, mtls_upstream: Upstream,
                                      tls_files: TLSFiles, rid: str) -> None:
    sync = SyncProxy(mtls_upstream.url, verify=tls_files.ca_pem,
                     cert=(tls_files.client_cert, tls_files.client_key))
    assert wsgi_get(sync, "/api", **{"x-req-id": rid}).status_code == 200
    assert mtls_upstream.wait_record(rid).header("x-forwarded-proto") == "http"

    trusted = AsyncProxy(https_upstream.url, verify=tls_files.client_context())
    assert asgi_get(trusted, "/api").status_code == 200
    untrusted = asgi_get(AsyncProxy(https_upstream.url), "/api")
    assert untrusted.status_code == 502
    assert "TLS verification" in untrusted.json()["detail"]


def test_certificate_for_another_name_is_refused(tls_files: TLSFiles) -> None:
    """The name checked is the upstream URL's host: a valid certificate of the trusted CA
    for another name is refused by both faces."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_files.ca.issue_cert("other.example").configure_cert(context)
    with Upstream(ssl=context) as elsewhere:
        for resp in (wsgi_get(SyncProxy(elsewhere.url, verify=tls_files.ca_pem), "/x"),
                     asgi_get(AsyncProxy(elsewhere.url, verify=tls_files.ca_pem), "/x")):
            assert resp.status_code == 502
            assert "mismatch" in resp.json()["detail"], resp.text
        assert elsewhere.records == []


@pytest.mark.parametrize("face", [SyncProxy, AsyncProxy])
def test_api_refuses_bad_tls_files_when_built(face: type[SyncProxy] | type[AsyncProxy],
                                              tls_files: TLSFiles) -> None:
    with pytest.raises(ValueError, match="/nonexistent/ca.pem"):
        face("https://127.0.0.1:9", verify="/nonexistent/ca.pem")
    with pytest.raises(ValueError, match="client certificate"):
        face("https://127.0.0.1:9", cert=tls_files.ca_pem)  # a certificate without its key
