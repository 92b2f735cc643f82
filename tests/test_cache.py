"""The HTTP cache (`--cache`, dualproxy/filters/cache/) on every pairing, in front of
the recording upstream: what it stores, what it never serves to another request, and
that a miss streams. Each test uses its own URL (the cache key) and counts what the
upstream received by `x-req-id`. The RFC's details are the conformance suite's
(tests/cache_conformance.py, `nox -s cache_conformance`)."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import MakeProxy, ProxyProcess, Redis
from tests.rawhttp import wait_until
from tests.upstream import Gate, Upstream, pattern_bytes, pattern_sha256

MiB = 1024 * 1024


@pytest.fixture
def cached(make_proxy: MakeProxy) -> ProxyProcess:
    return make_proxy("--cache")


def _get(proxy: ProxyProcess, path: str, rid: str, response: list[list[str]] | None = None,
         method: str = "GET", **headers: str) -> httpx.Response:
    sent = {"x-req-id": rid, "x-upstream": "headers",
            "x-upstream-headers": json.dumps(response or []), **headers}
    with proxy.client() as client:
        return client.request(method, path, headers=sent)


def _seen(upstream: Upstream, rid: str, expected: int) -> int:
    """How many requests with `rid` the upstream recorded (waiting for `expected`)."""
    deadline = time.monotonic() + 5
    while len(upstream.find_all(rid)) < expected and time.monotonic() < deadline:
        time.sleep(0.02)
    return len(upstream.find_all(rid))


def _gated_download(upstream: Upstream, name: str, size: int) -> tuple[Gate, str, str]:
    """A cacheable download of `size` bytes whose first chunk waits on a gate: its
    gate, its path and the `x-upstream` spec that asks for it."""
    return (upstream.gate(name), f"/cache/{name}",
            f"download size={size} gate={name} cc=max-age=60")


def test_fresh_response_is_a_hit(cached: ProxyProcess, upstream: Upstream, rid: str) -> None:
    path = f"/cache/hit-{rid}"
    first = _get(cached, path, rid, [["Cache-Control", "max-age=60"]])
    second = _get(cached, path, rid, [["Cache-Control", "max-age=60"]])
    assert first.status_code == second.status_code == 200
    assert first.content == second.content == b"ok"
    assert _seen(upstream, rid, 1) == 1
    assert "fwd=uri-miss" in first.headers["cache-status"]
    assert "stored" in first.headers["cache-status"]
    assert second.headers["cache-status"].startswith("dualproxy; hit")
    assert int(second.headers["age"]) >= 0
    head = _get(cached, path, rid, method="HEAD")  # HEAD from the stored GET
    assert head.status_code == 200 and head.headers["content-length"] == "2"
    assert _seen(upstream, rid, 1) == 1


def test_header_rules_apply_to_each_hit(make_proxy: MakeProxy, upstream: Upstream,
                                        rid: str) -> None:
    """A response header rule holds for every answer, hits included (nginx's add_header
    runs after proxy_cache): a hit carries its own request's id, never the stored one's."""
    proxy = make_proxy("--cache", "--request-id", "--header-down", "X-Seen: {request_id}")
    path = f"/cache/rules-{rid}"
    answers = [_get(proxy, path, rid, [["Cache-Control", "max-age=60"]]) for _ in range(2)]
    assert answers[1].headers["cache-status"].startswith("dualproxy; hit")
    assert _seen(upstream, rid, 1) == 1
    for answer in answers:
        assert answer.headers["x-seen"] == answer.headers["x-request-id"]
    assert answers[0].headers["x-seen"] != answers[1].headers["x-seen"]


def test_uncacheable_response_goes_upstream_each_time(cached: ProxyProcess,
                                                      upstream: Upstream, rid: str) -> None:
    path = f"/cache/nostore-{rid}"
    for _ in range(2):
        assert _get(cached, path, rid, [["Cache-Control", "no-store"]]).status_code == 200
    assert _seen(upstream, rid, 2) == 2


def test_vary_selects_the_variant(cached: ProxyProcess, upstream: Upstream, rid: str) -> None:
    path = f"/cache/vary-{rid}"
    cc = [["Cache-Control", "max-age=60"], ["Vary", "Accept-Language"]]
    _get(cached, path, rid, cc, **{"accept-language": "en"})
    _get(cached, path, rid, cc, **{"accept-language": "en"})
    assert _seen(upstream, rid, 1) == 1
    miss = _get(cached, path, rid, cc, **{"accept-language": "fr"})
    assert "fwd=vary-miss" in miss.headers["cache-status"]
    assert _seen(upstream, rid, 2) == 2
    _get(cached, path, rid, cc)  # no Accept-Language at all: another variant
    assert _seen(upstream, rid, 3) == 3
    again = _get(cached, path, rid, cc, **{"accept-language": "en"})
    assert again.headers["cache-status"].startswith("dualproxy; hit")
    assert _seen(upstream, rid, 3) == 3


def test_set_cookie_is_never_stored(cached: ProxyProcess, upstream: Upstream,
                                    rid: str) -> None:
    path = f"/cache/cookie-{rid}"
    response = [["Cache-Control", "max-age=60"], ["Set-Cookie", "session=alice"]]
    first = _get(cached, path, rid, response)
    second = _get(cached, path, rid, response)
    assert "stored" not in first.headers["cache-status"]
    assert second.headers["set-cookie"] == "session=alice"  # from the upstream, again
    assert _seen(upstream, rid, 2) == 2


def test_authorization_is_not_shared(cached: ProxyProcess, upstream: Upstream,
                                     rid: str) -> None:
    path = f"/cache/auth-{rid}"
    private = [["Cache-Control", "max-age=60"]]
    _get(cached, path, rid, private, authorization="Bearer alice")
    _get(cached, path, rid, private, authorization="Bearer bob")
    _get(cached, path, rid, private)
    assert _seen(upstream, rid, 3) == 3  # RFC 9111 3.5: none of these stored
    shared_rid = rid + "-public"
    public = [["Cache-Control", "public, max-age=60"]]
    _get(cached, path + "-public", shared_rid, public, authorization="Bearer alice")
    hit = _get(cached, path + "-public", shared_rid, public, authorization="Bearer bob")
    assert hit.headers["cache-status"].startswith("dualproxy; hit")
    assert _seen(upstream, shared_rid, 1) == 1
    # A stored answer is never given to an authorized request it does not allow.
    _get(cached, path + "-plain", rid + "-plain", private)
    _get(cached, path + "-plain", rid + "-plain", private, authorization="Bearer eve")
    assert _seen(upstream, rid + "-plain", 2) == 2


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_unsafe_method_invalidates(cached: ProxyProcess, upstream: Upstream, rid: str,
                                   method: str) -> None:
    path = f"/cache/unsafe-{rid}"
    cc = [["Cache-Control", "max-age=60"]]
    _get(cached, path, rid, cc)
    _get(cached, path, rid, cc)
    assert _seen(upstream, rid, 1) == 1
    assert _get(cached, path, rid, [], method=method).status_code == 200
    assert _seen(upstream, rid, 2) == 2
    after = _get(cached, path, rid, cc)
    assert "fwd=uri-miss" in after.headers["cache-status"]
    assert _seen(upstream, rid, 3) == 3


def test_stale_is_revalidated_and_304_answers_from_the_store(
        cached: ProxyProcess, upstream: Upstream, rid: str) -> None:
    path = f"/cache/etag-{rid}"
    _get(cached, path, rid, [["Cache-Control", "max-age=0"], ["ETag", '"v1"']])
    again = _get(cached, path, rid + "-2", [["Cache-Control", "max-age=60"], ["ETag", '"v1"']],
                 **{"x-upstream": "headers status=304"})
    record = upstream.wait_record(rid + "-2")
    assert record.header("if-none-match") == '"v1"'  # the cache made it conditional
    assert again.status_code == 200 and again.content == b"ok"  # the stored body
    assert "fwd-status=304" in again.headers["cache-status"]
    hit = _get(cached, path, rid + "-3", [])
    assert hit.headers["cache-status"].startswith("dualproxy; hit")  # freshened by the 304
    assert _seen(upstream, rid + "-3", 0) == 0


def test_large_miss_streams_then_hits(cached: ProxyProcess, upstream: Upstream,
                                      rid: str) -> None:
    size = 8 * MiB
    gate, path, spec = _gated_download(upstream, f"large-{rid}", size)
    digest = hashlib.sha256()
    try:
        timeout = httpx.Timeout(30.0, read=8.0)
        with httpx.Client(base_url=cached.url, timeout=timeout) as client, client.stream(
                "GET", path, headers={"x-req-id": rid, "x-upstream": spec}) as resp:
            chunks = resp.iter_raw()
            try:
                first = next(chunks)
            except httpx.ReadTimeout:
                pytest.fail("the miss was not streamed: no byte while the upstream waited")
            assert not gate.is_set()  # the upstream has not finished: nothing buffered whole
            digest.update(first)
            gate.set()
            for piece in chunks:
                digest.update(piece)
        assert "stored" in resp.headers["cache-status"]
    finally:
        gate.set()
    assert digest.hexdigest() == pattern_sha256(size)
    with cached.client() as client:
        hit = client.get(path, headers={"x-req-id": rid, "x-upstream": spec})
    assert hit.headers["cache-status"].startswith("dualproxy; hit")
    assert hashlib.sha256(hit.content).hexdigest() == pattern_sha256(size)
    assert _seen(upstream, rid, 1) == 1


def _rss_while(proxy: ProxyProcess, action: Callable[[], None]) -> int:
    """The proxy tree's peak RSS growth (bytes) while `action` runs, polled."""
    from tests.test_bodies import tree_rss

    before = peak = tree_rss(proxy.proc.pid)
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss(proxy.proc.pid))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        action()
    finally:
        done.set()
        watcher.join()
    return max(peak, tree_rss(proxy.proc.pid)) - before


def _streamed_miss(proxy: ProxyProcess, upstream: Upstream, rid: str, name: str,
                   size: int, extra: str = "") -> tuple[str, int]:
    """A gated download of `size` bytes through `proxy`: its first bytes must come
    while the upstream still waits; its Cache-Status and the proxy's RSS growth."""
    gate, path, spec = _gated_download(upstream, name, size)
    spec += extra
    digest = hashlib.sha256()
    statuses: list[str] = []

    def download() -> None:
        timeout = httpx.Timeout(60.0, read=8.0)
        with httpx.Client(base_url=proxy.url, timeout=timeout) as client, client.stream(
                "GET", path, headers={"x-req-id": rid, "x-upstream": spec}) as resp:
            statuses.append(resp.headers["cache-status"])
            chunks = resp.iter_raw()
            try:
                digest.update(next(chunks))
            except httpx.ReadTimeout:
                pytest.fail("the miss was not streamed: no byte while the upstream waited")
            assert not gate.is_set()  # the upstream has not finished: nothing buffered whole
            gate.set()
            for piece in chunks:
                digest.update(piece)

    try:
        grew = _rss_while(proxy, download)
    finally:
        gate.set()
    assert digest.hexdigest() == pattern_sha256(size)
    return statuses[0], grew


def _hit_digest(proxy: ProxyProcess, upstream: Upstream, rid: str, name: str,
                size: int, extra: str = "") -> tuple[str, str]:
    _, path, spec = _gated_download(upstream, name, size)
    spec += extra
    upstream.gate(name).set()
    with proxy.client() as client:
        again = client.get(path, headers={"x-req-id": rid, "x-upstream": spec})
    return again.headers["cache-status"], hashlib.sha256(again.content).hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_100mib_miss_over_the_object_limit_streams_uncached(
        make_proxy: MakeProxy, upstream: Upstream, rid: str, chunked: bool) -> None:
    """Past --cache-max-object a 100 MiB miss streams through in bounded memory (a
    chunked one is written to the store only up to the limit, then dropped), and is
    not stored: the next request is a miss again."""
    proxy = make_proxy("--cache", "--cache-max-object", "16M")
    size, extra = 100 * MiB, " chunked=1" if chunked else ""
    status, grew = _streamed_miss(proxy, upstream, rid, f"huge-{rid}", size, extra)
    assert ("stored" in status) is chunked  # a chunked one's length is not known yet
    assert grew < 64 * MiB, f"the proxy grew by {grew >> 20} MiB for a pass-through"
    status, digest = _hit_digest(proxy, upstream, rid, f"huge-{rid}", size, extra)
    assert "fwd=uri-miss" in status and digest == pattern_sha256(size)
    assert _seen(upstream, rid, 2) == 2


@pytest.mark.slow
def test_100mib_miss_streams_then_hits(make_proxy: MakeProxy, upstream: Upstream,
                                       rid: str) -> None:
    """Under a raised object limit, a 100 MiB miss streams (bytes before the upstream
    finished), is stored only once complete, holding about its own size once (never
    twice: no join at the end), and the hit serves the same bytes."""
    proxy = make_proxy("--cache", "--cache-max-object", "128M")
    size = 100 * MiB
    status, grew = _streamed_miss(proxy, upstream, rid, f"huge-stored-{rid}", size)
    assert "stored" in status
    assert grew < size + 48 * MiB, f"the proxy grew by {grew >> 20} MiB storing 100 MiB"
    status, digest = _hit_digest(proxy, upstream, rid, f"huge-stored-{rid}", size)
    assert status.startswith("dualproxy; hit") and digest == pattern_sha256(size)
    assert _seen(upstream, rid, 1) == 1


@pytest.mark.parametrize("store", ["memory", "sqlite", "redis"])
def test_eviction_under_the_size_bound(make_proxy: MakeProxy, upstream: Upstream, rid: str,
                                       store: str, request: pytest.FixtureRequest,
                                       tmp_path: Path) -> None:
    """--cache-max-size 1M and bodies of 240 KiB: four fit, a fifth evicts the least
    recently used one; what stays is within the bound, and a fresh entry still hits."""
    flags = ["--cache", "--cache-max-size", "1M"]
    if store == "sqlite":
        flags += ["--cache-store", f"sqlite:{tmp_path / 'cache.db'}"]
    elif store == "redis":
        flags += ["--cache-store", request.getfixturevalue("redis_server").url]
    proxy = make_proxy(*flags)
    size = 240 * 1024

    def fetch(name: str) -> str:
        spec = f"download size={size} cc=max-age=60"
        with proxy.client() as client:
            answer = client.get(f"/cache/evict-{rid}-{name}",
                                headers={"x-req-id": f"{rid}-{name}", "x-upstream": spec})
        assert answer.status_code == 200 and len(answer.content) == size
        return answer.headers["cache-status"]

    for name in "abcd":
        assert "stored" in fetch(name)
        time.sleep(0.01)  # distinct use times (sqlite and Redis order by the clock)
    assert fetch("a").startswith("dualproxy; hit")  # a is now the most recently used
    time.sleep(0.01)
    assert "stored" in fetch("e")  # past 1M: the least recently used (b) goes
    time.sleep(0.01)
    hits = {name: fetch(name).startswith("dualproxy; hit") for name in "acde"}
    assert hits == dict.fromkeys("acde", True)  # four entries: within the bound
    assert "fwd=uri-miss" in fetch("b")  # evicted
    assert len(upstream.find_all(f"{rid}-b")) == 2


def test_aborted_miss_is_not_stored(cached: ProxyProcess, upstream: Upstream,
                                    rid: str) -> None:
    path = f"/cache/cut-{rid}"
    spec = "cut size=100000 after=50000 cc=max-age=60"
    with cached.client() as client:
        with pytest.raises(httpx.HTTPError):
            client.get(path, headers={"x-req-id": rid, "x-upstream": spec})
    after = _get(cached, path, rid, [["Cache-Control", "max-age=60"]])
    assert "fwd=uri-miss" in after.headers["cache-status"]  # the short body was not kept
    assert after.content == b"ok"
    assert _seen(upstream, rid, 2) == 2


def test_purge_from_a_trusted_peer(make_proxy: MakeProxy, upstream: Upstream,
                                   rid: str) -> None:
    proxy = make_proxy("--cache", "--cache-purge-from", "127.0.0.1/32")
    path = f"/cache/purge-{rid}"
    cc = [["Cache-Control", "max-age=60"]]
    _get(proxy, path, rid, cc)
    with proxy.client() as client:
        purged = client.request("PURGE", path)
        assert purged.status_code == 200 and purged.json() == {"purged": 1}
        assert client.request("PURGE", path).status_code == 404  # nothing left
    after = _get(proxy, path, rid, cc)
    assert "fwd=uri-miss" in after.headers["cache-status"]
    assert _seen(upstream, rid, 2) == 2
    assert all(r.method == "GET" for r in upstream.find_all(rid))  # PURGE never upstream


def test_purge_from_anyone_else_is_405(cached: ProxyProcess, upstream: Upstream,
                                       rid: str) -> None:
    path = f"/cache/nopurge-{rid}"
    cc = [["Cache-Control", "max-age=60"]]
    _get(cached, path, rid, cc)
    with cached.client() as client:
        refused = client.request("PURGE", path)
    assert refused.status_code == 405
    assert refused.headers["content-type"] == "application/problem+json"
    assert _get(cached, path, rid, cc).headers["cache-status"].startswith("dualproxy; hit")
    assert _seen(upstream, rid, 1) == 1


def test_concurrent_misses_collapse_into_one_fetch(cached: ProxyProcess, upstream: Upstream,
                                                   rid: str) -> None:
    size = 2 * MiB
    gate, path, spec = _gated_download(upstream, f"collapse-{rid}", size)
    results: list[tuple[str, str]] = []
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            with httpx.Client(base_url=cached.url, timeout=30.0) as client:
                resp = client.get(path, headers={"x-req-id": rid, "x-upstream": spec})
            results.append((resp.headers["cache-status"],
                            hashlib.sha256(resp.content).hexdigest()))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(20)]
    try:
        for thread in threads:
            thread.start()
        assert _seen(upstream, rid, 1) == 1
        time.sleep(1.0)  # every request has arrived and waits on the one fetch
        assert not gate.is_set()
    finally:
        gate.set()
        for thread in threads:
            thread.join(30)
    assert not errors, errors
    assert len(results) == 20
    assert {digest for _, digest in results} == {pattern_sha256(size)}
    collapsed = sum("collapsed" in status for status, _ in results)
    # A request the server took up only after the fetch completed is a hit (wsgi-granian
    # under load: its requests queue for a thread); none may have gone upstream.
    late = sum(status.startswith("dualproxy; hit") for status, _ in results)
    assert collapsed + late == 19 and collapsed >= 15, [status for status, _ in results]
    assert len(upstream.find_all(rid)) == 1


def test_stale_while_revalidate_answers_at_once_and_refreshes_behind(
        cached: ProxyProcess, upstream: Upstream, rid: str) -> None:
    path = f"/cache/swr-{rid}"
    _get(cached, path, rid, [["Cache-Control", "max-age=1, stale-while-revalidate=60"],
                             ["ETag", '"v1"']])
    time.sleep(1.5)  # stale now, within its stale-while-revalidate window
    refresh = [["Cache-Control", "max-age=60"], ["ETag", '"v2"']]
    stale = _get(cached, path, rid, refresh)
    assert stale.status_code == 200 and stale.content == b"ok"
    assert stale.headers["cache-status"].startswith("dualproxy; hit; ttl=-")
    assert "fwd=stale" in stale.headers["cache-status"]
    assert _seen(upstream, rid, 2) == 2  # the one refresh, behind the answer
    assert upstream.find_all(rid)[1].header("if-none-match") == '"v1"'
    deadline = time.monotonic() + 5
    while True:  # the refreshed response replaces the stale one
        fresh = _get(cached, path, rid, refresh)
        if fresh.headers.get("etag") == '"v2"' or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert fresh.headers["etag"] == '"v2"'
    assert "fwd" not in fresh.headers["cache-status"]
    assert len(upstream.find_all(rid)) == 2


def test_sqlite_store_is_shared_by_the_workers(make_proxy: MakeProxy, upstream: Upstream,
                                               rid: str, tmp_path: Path) -> None:
    proxy = make_proxy("--cache", "--cache-store", f"sqlite:{tmp_path / 'cache.db'}",
                       "--workers", "2")
    path = f"/cache/sqlite-{rid}"
    cc = [["Cache-Control", "max-age=60"]]
    statuses = [_get(proxy, path, rid, cc).headers["cache-status"] for _ in range(12)]
    assert "stored" in statuses[0]
    assert all(s.startswith("dualproxy; hit") for s in statuses[1:])  # whichever worker
    assert _seen(upstream, rid, 1) == 1
    ranged = _get(proxy, path, rid, cc, range="bytes=1-")
    assert ranged.status_code == 206 and ranged.content == b"k"


def test_a_failing_store_steps_aside(make_proxy: MakeProxy, upstream: Upstream,
                                     rid: str) -> None:
    proxy = make_proxy("--cache", "--cache-store", "sqlite:/nonexistent-dir/cache.db")
    path = f"/cache/broken-store-{rid}"
    for _ in range(2):
        answer = _get(proxy, path, rid, [["Cache-Control", "max-age=60"]])
        assert answer.status_code == 200 and answer.content == b"ok"
    assert _seen(upstream, rid, 2) == 2
    assert "the sqlite store failed" in proxy.log()


def test_two_proxies_share_one_redis(make_proxy: MakeProxy, upstream: Upstream, rid: str,
                                     redis_server: Redis) -> None:
    one = make_proxy("--cache", "--cache-store", redis_server.url)
    other = make_proxy("--cache", "--cache-store", redis_server.url, "--workers", "2")
    path = f"/cache/redis-{rid}"
    cc = [["Cache-Control", "max-age=60"], ["Vary", "Accept"]]
    # The key is the public URL: both proxies serve shop.example (behind one balancer).
    public = {"accept": "text/plain", "host": "shop.example"}
    stored = _get(one, path, rid, cc, **public)
    assert "stored" in stored.headers["cache-status"]
    for proxy in (other, one, other):  # a miss on one is a hit on the other
        hit = _get(proxy, path, rid, cc, **public)
        assert hit.headers["cache-status"].startswith("dualproxy; hit")
        assert hit.content == b"ok"
    assert _seen(upstream, rid, 1) == 1
    _get(other, path, rid, [], method="DELETE", host="shop.example")  # for both
    assert "fwd=uri-miss" in _get(one, path, rid, cc, **public).headers["cache-status"]
    assert _seen(upstream, rid, 3) == 3


def test_redis_killed_mid_run_requests_still_served(make_proxy: MakeProxy,
                                                    upstream: Upstream, rid: str,
                                                    redis_server: Redis) -> None:
    from tests.test_metrics import value, with_metrics

    proxy, metrics = with_metrics(make_proxy, "--cache", "--cache-store", redis_server.url)
    path = f"/cache/redis-down-{rid}"
    cc = [["Cache-Control", "max-age=60"]]
    _get(proxy, path, rid, cc)
    assert _get(proxy, path, rid, cc).headers["cache-status"].startswith("dualproxy; hit")
    before = metrics.settled()
    redis_server.stop()
    for _ in range(3):
        answer = _get(proxy, path, rid, cc)
        assert answer.status_code == 200 and answer.content == b"ok"
    assert _seen(upstream, rid, 4) == 4  # uncached now, never a 5xx
    log = proxy.log()
    assert log.count("the redis store failed") == 1  # one WARNING for the outage
    errors = (value(metrics.settled(), "dualproxy_cache_store_errors_total", route="/")
              - value(before, "dualproxy_cache_store_errors_total", route="/"))
    assert errors == 3


def test_a_slow_redis_holds_no_other_request(make_proxy: MakeProxy, upstream: Upstream,
                                             rid: str, redis_server: Redis,
                                             tmp_path: Path) -> None:
    """While Redis stalls (CLIENT PAUSE holds every other client's commands), a cached
    route's lookup waits for it; a route without cache on the same worker still answers
    at once: on the async face the store is awaited, the event loop is not held."""
    import redis

    routes = tmp_path / "routes.toml"
    routes.write_text(f"""\
[[route]]
mount = "/cached"
upstream = "{upstream.url}"
cache = true
cache_store = "{redis_server.url}"

[[route]]
mount = "/plain"
upstream = "{upstream.url}"
""")
    proxy = make_proxy("--config", str(routes), upstream_url="")
    cc = [["Cache-Control", "max-age=60"]]
    path = f"/cached/slow-{rid}"
    assert "stored" in _get(proxy, path, rid, cc).headers["cache-status"]
    assert _get(proxy, path, rid, cc).headers["cache-status"].startswith("dualproxy; hit")
    assert _get(proxy, "/plain/warm", rid + "-plain").status_code == 200
    stalled: list[httpx.Response] = []
    waiting = threading.Thread(target=lambda: stalled.append(_get(proxy, path, rid, cc)))
    with redis.Redis(port=redis_server.port) as admin:
        admin.execute_command("CLIENT", "PAUSE", 2500)
        waiting.start()
        time.sleep(0.3)  # the cached request waits on Redis now
        started = time.monotonic()
        plain = _get(proxy, "/plain/during", rid + "-plain")
        elapsed = time.monotonic() - started
        waiting.join(30)
    assert plain.status_code == 200
    assert elapsed < 0.5, f"a request without cache waited {elapsed:.2f} s on Redis"
    assert stalled and stalled[0].status_code == 200 and stalled[0].content == b"ok"


def test_access_log_and_metrics_count_what_the_cache_did(make_proxy: MakeProxy,
                                                         upstream: Upstream, rid: str) -> None:
    from tests.test_metrics import value, with_metrics

    proxy, metrics = with_metrics(make_proxy, "--cache")
    before = metrics.settled()
    path = f"/cache/counted-{rid}"
    cc = [["Cache-Control", "max-age=60"]]
    for _ in range(3):
        _get(proxy, path, rid, cc)
    _get(proxy, path, rid, cc, method="POST")
    after = metrics.settled()
    counts = {result: value(after, "dualproxy_cache_requests_total", route="/", result=result)
              - value(before, "dualproxy_cache_requests_total", route="/", result=result)
              for result in ("hit", "miss", "bypass")}
    assert counts == {"hit": 2, "miss": 1, "bypass": 1}
    stored = (value(after, "dualproxy_cache_stored_bytes_total", route="/")
              - value(before, "dualproxy_cache_stored_bytes_total", route="/"))
    assert stored == 2
    log = proxy.log()
    assert f"GET {path} 200" in log and " cache=hit" in log and " cache=miss" in log


# ------------------------------------------------------------------ configuration and policy


def test_cache_keys_in_a_config_file(tmp_path: Path) -> None:
    from dualproxy.cli import check_route, load_config_file

    path = tmp_path / "routes.toml"
    path.write_text('[[route]]\nmount = "/api"\nupstream = "http://127.0.0.1:9"\n'
                    'cache = true\ncache_store = "sqlite:/tmp/dp.db"\n'
                    'cache_max_size = "512M"\ncache_purge_from = ["10.0.0.0/8"]\n')
    _, routes = load_config_file(str(path), ["serve", "--config", str(path)])
    config = check_route(routes[0])
    assert (config.cache, config.cache_store, config.cache_max_size) == (
        True, "sqlite:/tmp/dp.db", 512 << 20)
    assert config.may_purge("10.1.2.3") and not config.may_purge("192.0.2.1")
    with pytest.raises(ValueError, match="cache_store"):
        check_route({**routes[0], "cache_store": "disk"})


def test_policy_parsing() -> None:
    from dualproxy.filters.cache import policy

    assert policy.parse_date(b"Sun, 06 Nov 1994 08:49:37 GMT") == 784111777
    assert policy.parse_date(b"Sunday, 06-Nov-94 08:49:37 GMT") == 784111777
    assert policy.parse_date(b"Sun Nov  6 08:49:37 1994") == 784111777
    assert policy.parse_date(b"sun, 06 nov 1994 08:49:37 gmt") == 784111777
    for bad in (b"0", b"Sun, 06 Nov 1994 08:49:37 UTC", b"Sun, 06 Nov 94 08:49:37 GMT",
                b"Sun 06 Nov 1994 08:49:37 GMT", b"Sun, 06 Nov 1994 8:49:37 GMT"):
        assert policy.parse_date(bad) is None, bad
    cc = policy.Directives.parse([b'extension="max-age=3600", max-age=1', b"max-age=9"])
    assert cc.seconds("max-age") == 1  # the first, never one inside a quoted string
    assert policy.Directives.parse([b"max-age=99999999999"]).seconds("max-age") == 2 ** 31
    assert policy.Directives.parse([b"max-age='1'"]).seconds("max-age") == -1
    assert policy.age_value([(b"age", b"0, 7200")]) == 0
    assert policy.age_value([(b"age", b"-1")]) == 0
    assert policy.byte_range(b"bytes=-5", 10) == (5, 9)
    assert policy.byte_range(b"bytes=2-", 10) == (2, 9)
    assert policy.byte_range(b"bytes=0-1, 3-4", 10) is None
    assert policy.byte_range(b"bytes=10-", 10) is None


def _redis_keys(server: Redis, kind: str) -> list[bytes]:
    """The cache's keys of one kind in `server`: "i" (a URI's variants), "b" (chunks)."""
    import redis

    with redis.Redis(port=server.port) as admin:
        return list(admin.scan_iter(f"dualproxy:cache:{kind}:*", count=1000))


@pytest.mark.slow
def test_100mib_redis_hit_streams_from_chunks(make_proxy: MakeProxy, upstream: Upstream,
                                              rid: str, redis_server: Redis) -> None:
    """A 100 MiB body goes into Redis as chunk keys (several, none of it whole) and a
    hit on another proxy (that never held the body) streams it from them: the proxy's
    RSS grows by a few chunks, not by the body; the bytes are the same."""
    flags = ("--cache", "--cache-store", redis_server.url, "--cache-max-object", "128M")
    size, name = 100 * MiB, f"huge-redis-{rid}"
    status, _ = _streamed_miss(make_proxy(*flags), upstream, rid, name, size)
    assert "stored" in status
    chunks = _redis_keys(redis_server, "b")
    assert len(chunks) >= 100  # 256 KiB each
    other = make_proxy(*flags)
    results: list[tuple[str, str]] = []
    grew = _rss_while(other, lambda: results.append(
        _hit_digest(other, upstream, rid, name, size)))
    (status, digest), = results
    assert status.startswith("dualproxy; hit") and digest == pattern_sha256(size)
    assert grew < 40 * MiB, f"the proxy grew by {grew >> 20} MiB for a 100 MiB hit"
    assert _seen(upstream, rid, 1) == 1


def test_redis_entry_keys_all_go_on_purge_and_eviction(make_proxy: MakeProxy,
                                                       upstream: Upstream, rid: str,
                                                       redis_server: Redis) -> None:
    """A stored body of 600 KiB is three chunk keys; a PURGE removes them all with the
    URI's index, and so does an eviction (--cache-max-size 1M: a second body evicts)."""
    proxy = make_proxy("--cache", "--cache-store", redis_server.url, "--cache-max-size",
                       "1M", "--cache-purge-from", "127.0.0.1/32")
    spec = f"download size={600 * 1024} cc=max-age=60"

    def fetch(name: str) -> str:
        with proxy.client() as client:
            answer = client.get(f"/cache/keys-{rid}-{name}",
                                headers={"x-req-id": f"{rid}-{name}", "x-upstream": spec})
        assert answer.status_code == 200 and len(answer.content) == 600 * 1024
        return answer.headers["cache-status"]

    assert "stored" in fetch("a")
    assert len(_redis_keys(redis_server, "b")) == 3
    assert len(_redis_keys(redis_server, "i")) == 1
    with proxy.client() as client:
        assert client.request("PURGE", f"/cache/keys-{rid}-a").json() == {"purged": 1}
    assert _redis_keys(redis_server, "b") == _redis_keys(redis_server, "i") == []
    assert "stored" in fetch("b")
    time.sleep(0.01)
    assert "stored" in fetch("c")  # past 1M: b goes, its chunks with it
    assert len(_redis_keys(redis_server, "b")) == 3
    (index,) = _redis_keys(redis_server, "i")
    assert index.endswith(f"/cache/keys-{rid}-c".encode())
    assert "fwd=uri-miss" in fetch("b")


def test_redis_aborted_miss_deletes_its_chunks(make_proxy: MakeProxy, upstream: Upstream,
                                               rid: str, redis_server: Redis) -> None:
    """A miss whose upstream cuts its 1.8 MB body (Content-Length) after 1.5 MB wrote
    four chunks as they came (SETs Redis counted) and deletes them at once: no chunk
    key stays (the TTL would keep them an hour). So does a 32 MiB miss whose client
    leaves after 2 MiB. A cut refetch of a stored URI (no-cache: upstream again) deletes
    its own chunks only: the stored entry's stay, and hit."""
    import redis

    proxy = make_proxy("--cache", "--cache-store", redis_server.url)
    cut = "cut size=1800000 after=1500000 cc=max-age=60"

    def sets() -> int:
        with redis.Redis(port=redis_server.port) as admin:
            return int(admin.info("commandstats").get("cmdstat_set", {}).get("calls", 0))

    def fetch_cut(path: str, **headers: str) -> None:
        with proxy.client() as client, pytest.raises(httpx.HTTPError):
            client.get(path, headers={"x-req-id": rid, "x-upstream": cut, **headers})

    before = sets()
    fetch_cut(f"/cache/abort-{rid}-a")
    assert sets() - before >= 4  # the chunks of the first MiB were written
    assert wait_until(lambda: _redis_keys(redis_server, "b") == [], timeout=5), \
        "an aborted miss left its chunks in Redis"
    assert _redis_keys(redis_server, "i") == []
    before, got = sets(), 0
    gate = upstream.gate(f"abort-{rid}-gone")  # 2 MiB go, the rest waits on it
    with httpx.Client(base_url=proxy.url, timeout=httpx.Timeout(30.0)) as client, \
            client.stream("GET", f"/cache/abort-{rid}-gone", headers={
                "x-req-id": rid, "x-upstream": f"download size={32 * MiB} chunk={2 * MiB} "
                                              f"gate=abort-{rid}-gone cc=max-age=60"}
            ) as resp:
        for piece in resp.iter_raw():
            got += len(piece)
            if got >= 2 * MiB:
                break  # the client leaves mid-body
    assert sets() - before >= 4
    time.sleep(0.3)  # the proxy sees the client gone (the async face: at once)
    gate.set()  # (the sync face: at its next write)
    assert wait_until(lambda: _redis_keys(redis_server, "b") == [], timeout=5), \
        "a miss whose client left kept its chunks in Redis"
    assert _redis_keys(redis_server, "i") == []
    path, spec = f"/cache/abort-{rid}-b", f"download size={600 * 1024} cc=max-age=60"
    with proxy.client() as client:
        first = client.get(path, headers={"x-req-id": rid, "x-upstream": spec})
    assert "stored" in first.headers["cache-status"]
    stored = sorted(_redis_keys(redis_server, "b"))
    assert len(stored) == 3
    before = sets()
    fetch_cut(path, **{"cache-control": "no-cache"})
    assert sets() - before >= 4
    assert wait_until(lambda: sorted(_redis_keys(redis_server, "b")) == stored, timeout=5)
    with proxy.client() as client:
        hit = client.get(path, headers={"x-req-id": rid, "x-upstream": spec})
    assert hit.headers["cache-status"].startswith("dualproxy; hit")
    assert hit.content == pattern_bytes(600 * 1024)


def test_redis_killed_during_a_hit_cuts_the_answer(make_proxy: MakeProxy, upstream: Upstream,
                                                   rid: str, redis_server: Redis) -> None:
    """Redis stops while a 32 MiB hit streams: the client's body ends short and the
    proxy aborts it (never a complete-looking body)."""
    proxy = make_proxy("--cache", "--cache-store", redis_server.url)
    size, name = 32 * MiB, f"cut-redis-{rid}"
    _, path, spec = _gated_download(upstream, name, size)
    upstream.gate(name).set()
    headers = {"x-req-id": rid, "x-upstream": spec}
    with proxy.client() as client:
        assert "stored" in client.get(path, headers=headers).headers["cache-status"]
    got = 0
    with pytest.raises(httpx.HTTPError), httpx.Client(
            base_url=proxy.url, timeout=httpx.Timeout(30.0)) as client, client.stream(
            "GET", path, headers=headers) as resp:
        assert resp.headers["cache-status"].startswith("dualproxy; hit")
        assert resp.headers["content-length"] == str(size)
        for piece in resp.iter_raw():
            if not got:
                redis_server.stop()
            got += len(piece)
    assert 0 < got < size


def test_redis_ranges_across_chunks(make_proxy: MakeProxy, upstream: Upstream, rid: str,
                                    redis_server: Redis) -> None:
    """Ranges of a body stored in Redis chunks, within one chunk, across chunks and
    across the MiB reads, to the end: the same bytes as the body's."""
    proxy = make_proxy("--cache", "--cache-store", redis_server.url)
    size = 2 * MiB + 123_457
    body = pattern_bytes(size)
    headers = {"x-req-id": rid, "x-upstream": f"download size={size} cc=max-age=60"}
    path = f"/cache/ranges-{rid}"
    with proxy.client() as client:
        assert "stored" in client.get(path, headers=headers).headers["cache-status"]
        for start, end in [(10, 20), (262_000, 263_000), (MiB - 5, MiB + 300_000),
                           (0, size - 1), (2 * MiB - 1, size - 1)]:
            part = client.get(path, headers={**headers, "range": f"bytes={start}-{end}"})
            assert part.status_code == 206, (start, end)
            assert part.content == body[start:end + 1], (start, end)
    assert _seen(upstream, rid, 1) == 1


def test_redis_body_written_as_it_comes_never_served_cut(
        make_proxy: MakeProxy, upstream: Upstream, rid: str, redis_server: Redis) -> None:
    """A miss whose upstream breaks after 1.5 of 1.8 MB: its chunks, written to Redis as
    they came, are deleted, no entry was made of them (the next request is a miss); a
    chunked miss growing past --cache-max-object leaves no chunk behind."""
    proxy = make_proxy("--cache", "--cache-store", redis_server.url,
                       "--cache-max-object", "2M")
    path = f"/cache/cut-redis-{rid}"
    with proxy.client() as client, pytest.raises(httpx.HTTPError):
        client.get(path, headers={"x-req-id": rid,
                                  "x-upstream": "cut size=1800000 after=1500000 "
                                                "chunked=1 cc=max-age=60"})
    assert wait_until(lambda: _redis_keys(redis_server, "b") == [], timeout=5)
    assert _redis_keys(redis_server, "i") == []
    after = _get(proxy, path, rid, [["Cache-Control", "max-age=60"]])
    assert "fwd=uri-miss" in after.headers["cache-status"]  # (stored now: one chunk)
    big = f"/cache/big-redis-{rid}"
    with proxy.client() as client:
        answer = client.get(big, headers={"x-req-id": rid + "-big", "x-upstream":
                                          f"download size={5 * MiB} chunked=1 cc=max-age=60"})
    assert answer.status_code == 200 and len(answer.content) == 5 * MiB
    assert len(_redis_keys(redis_server, "b")) == 1  # the 2 MiB it had written: gone
    assert "fwd=uri-miss" in _get(proxy, big, rid + "-big", []).headers["cache-status"]
