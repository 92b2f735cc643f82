"""HTTP/2 to clients (`--http auto|2`): granian serves it, the others refuse the flag.

On the granian pairings a proxy with `--http auto` is spoken to by httpx's HTTP/2 client
with prior knowledge (h2c, no TLS): many streams at once on one connection, large
bodies both ways streamed and hashed, SSE events each read before the next is sent, and
a client resetting one stream (its upstream request aborted, the others unaffected);
and over TLS, where ALPN picks h2 or HTTP/1.1. On uvicorn and gunicorn `--http 2` is a
one-line usage error: they serve HTTP/1.1 only.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import ROOT, ProxyProcess, TLSFiles, transfer_hashed
from tests.rawhttp import wait_until
from tests.upstream import Upstream


def start_h2(pairing: str, upstream: Upstream, *flags: str) -> ProxyProcess:
    """A proxy with `--http auto` on the granian pairings; on the others, the refusal of
    `--http 2` checked, then a visible xfail."""
    if not pairing.endswith("-granian"):
        # The behaviour there: the flag is refused before anything starts.
        done = subprocess.run(
            [sys.executable, "-m", "dualproxy", "serve", "--upstream", upstream.url,
             "--adapter", pairing.split("-")[0], "--server", pairing.split("-")[1],
             "--http", "2"], cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert "--http 2 needs --server granian" in done.stderr
        pytest.xfail("uvicorn and gunicorn serve HTTP/1.1 only: --http 2 is a usage error")
    return ProxyProcess(pairing, upstream.url, ("--http", "auto", *flags))


@pytest.fixture
def h2_proxy(pairing: str, upstream: Upstream) -> Iterator[ProxyProcess]:
    proxy = start_h2(pairing, upstream)
    yield proxy
    proxy.stop()


def h2_client(proxy: ProxyProcess) -> httpx.AsyncClient:
    # The async client, not the sync one shared by threads: httpcore's sync HTTP/2 takes a
    # stream id outside its write lock, so two threads can send HEADERS for streams 15 and
    # 13 in that order, which the server rightly answers with GOAWAY(PROTOCOL_ERROR) (seen
    # once in CI). On one event loop the id and its HEADERS frame are taken without an await
    # between them.
    return httpx.AsyncClient(base_url=proxy.url, timeout=30.0, http1=False, http2=True)


def test_many_streams_on_one_connection(h2_proxy: ProxyProcess) -> None:
    """24 requests at once from one HTTP/2 client (httpx opens one connection for them)."""
    async def run() -> tuple[dict[int, tuple[str, int, str]], float]:
        async with h2_client(h2_proxy) as client:
            async def get(i: int) -> tuple[str, int, str]:
                resp = await client.get(f"/h2/{i}", headers={
                    "x-req-id": f"h2-many-{i}", "x-upstream": "sleep seconds=0.3"})
                return resp.http_version, resp.status_code, resp.json()["target"]

            started = time.monotonic()
            got = await asyncio.gather(*(get(i) for i in range(24)))
            return dict(enumerate(got)), time.monotonic() - started

    results, elapsed = asyncio.run(run())
    assert results == {i: ("HTTP/2", 200, f"/h2/{i}") for i in range(24)}
    assert elapsed < 0.3 * 24 / 2, elapsed  # concurrent, not one after the other


def test_large_bodies_both_ways(h2_proxy: ProxyProcess, upstream: Upstream) -> None:
    transfer_hashed(h2_proxy, upstream, 24 << 20, http1=False, http2=True)


def test_a_reset_stream_aborts_its_upstream_request_only(h2_proxy: ProxyProcess,
                                                        upstream: Upstream) -> None:
    async def run() -> list[int]:
        async with h2_client(h2_proxy) as client:
            other: list[int] = []

            async def steady() -> None:
                async with client.stream("GET", "/steady", headers={
                        "x-req-id": "h2-steady",
                        "x-upstream": "trickle size=12 interval=0.25"}) as resp:
                    other.append(sum([len(piece) async for piece in resp.aiter_raw()]))

            task = asyncio.create_task(steady())
            async with client.stream("GET", "/reset", headers={
                    "x-req-id": "h2-reset", "x-upstream": "trickle size=400 interval=0.1"}
                    ) as resp:
                assert resp.http_version == "HTTP/2"
                await resp.aiter_raw().__anext__()  # then the stream is closed early: RST_STREAM
            await asyncio.wait_for(task, 30)
            return other

    assert asyncio.run(run()) == [12]  # the other stream went on to its end
    # The reset stream's exchange ended at once (400 bytes at 10 a second would take 40 s).
    assert wait_until(lambda: outcome(h2_proxy, "GET /reset") == "client-gone", timeout=10), \
        h2_proxy.log()[-2000:]
    assert outcome(h2_proxy, "GET /steady") == "ok"


def outcome(proxy: ProxyProcess, request: str) -> str | None:
    """The outcome word of the access line for `request` ("GET /t"), once it is written."""
    lines = [line for line in proxy.log().splitlines() if f"dualproxy.access: {request} " in line]
    return lines[-1].rsplit(" ", 1)[1] if lines else None


def test_tls_offers_h2_by_alpn(pairing: str, upstream: Upstream, tls_files: TLSFiles,
                               rid: str) -> None:
    """Serving HTTPS with `--http auto`: a client offering h2 by ALPN gets HTTP/2, one
    offering only http/1.1 gets HTTP/1.1, and both reach the upstream."""
    proxy = start_h2(pairing, upstream, "--certfile", tls_files.server_cert,
                     "--keyfile", tls_files.server_key)
    try:
        assert proxy.url.startswith("https://")
        for http2, version in ((True, "HTTP/2"), (False, "HTTP/1.1")):
            with proxy.client(verify=tls_files.client_context(), http2=http2) as client:
                resp = client.get("/alpn", headers={"x-req-id": f"{rid}-{version}"})
            assert (resp.http_version, resp.status_code) == (version, 200), resp.text
            assert upstream.wait_record(f"{rid}-{version}").target == b"/alpn"
    finally:
        proxy.stop()


def test_sse_events_arrive_live_over_http2(h2_proxy: ProxyProcess, upstream: Upstream) -> None:
    """The upstream sends an event and waits for the client to have read it before it
    sends the next: a proxy or server holding DATA frames back would time out here."""
    gate, count = uuid.uuid4().hex, 4

    async def run() -> bytes:
        async with h2_client(h2_proxy) as client, client.stream(
                "GET", "/events", headers={"x-upstream": f"sse count={count} gate={gate}"},
                timeout=httpx.Timeout(30.0, read=10.0)) as resp:
            assert resp.http_version == "HTTP/2"
            assert resp.headers["content-type"] == "text/event-stream"
            chunks = resp.aiter_raw()
            text = b""
            for i in range(count):
                event = f"data: event-{i}\n\n".encode()
                while event not in text:
                    text += await chunks.__anext__()
                upstream.gate(f"{gate}-{i}").set()  # read: the upstream may send the next
            return text + b"".join([rest async for rest in chunks])

    assert asyncio.run(run()) == b"".join(f"data: event-{i}\n\n".encode() for i in range(count))
