"""The built-in filters on every pairing: header rules, X-Forwarded-Prefix, request ids.

Requests are written with raw sockets where the exact headers matter; the
recording upstream shows what arrived. The last tests put a FastAPI app that
reads X-Forwarded-Prefix behind a mount and follow the links it builds.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from dualproxy.config import ProxyConfig
from dualproxy.errors import BadRequest
from dualproxy.filters.request_id import acceptable
from dualproxy.rules import apply, parse_rule
from tests.conftest import MakeProxy
from tests.rawhttp import exchange, request_bytes, wait_until
from tests.test_headers import send, upstream_answers
from tests.test_integrations import App, uvicorn
from tests.upstream import Upstream

TRUST = ("--trusted-proxy", "127.0.0.1/32")
HEX_ID = re.compile(r"[0-9a-f]{32}\Z")


# --- header rules ---------------------------------------------------------------------------

UP_RULES = ("--request-id", "--header-up", "X-Real-IP: {client}", "--header-up=-Cookie",
            "--header-up", "+X-Via: {scheme}://{host}", "--header-up", "X-Rid: {request_id}",
            "--header-up", "Host: internal.example", "--header-up", "X-Braces: {{client}}")


def test_header_up_rules_with_variables(make_proxy: MakeProxy, upstream: Upstream,
                                        rid: str) -> None:
    proxy = make_proxy(*TRUST, *UP_RULES)
    response = send(proxy, rid, [("X-Forwarded-For", "203.0.113.9"), ("Cookie", "a=1"),
                                 ("X-Via", "first"), ("X-Real-IP", "6.6.6.6")])
    assert response.status == 200
    record = upstream.wait_record(rid)
    # {client}: the address after trusted proxies; set replaces the client's own line.
    assert record.header_all("x-real-ip") == ["203.0.113.9"]
    assert record.header("cookie") is None
    assert record.header_all("x-via") == ["first", "http://front.test"]
    assert record.header_all("x-rid") == [response.header("x-request-id")]
    assert record.header_all("host") == ["internal.example"]
    assert record.header_all("x-braces") == ["{client}"]


def test_header_down_rules(make_proxy: MakeProxy, rid: str) -> None:
    proxy = make_proxy("--header-down", "+Cache-Control: no-store",
                       "--header-down=-X-Secret",
                       "--header-down", "X-Served-For: {client} via {scheme}",
                       "--header-down", "X-Empty:")
    response = upstream_answers(proxy, rid, [
        ["Cache-Control", "public"], ["X-Secret", "s1"], ["X-Secret", "s2"],
        ["X-Served-For", "upstream"], ["X-Empty", "gone"], ["Content-Length", "0"]])
    assert response.status == 200
    assert response.header_all("cache-control") == ["public", "no-store"]
    assert response.header("x-secret") is None
    assert response.header_all("x-served-for") == ["127.0.0.1 via http"]
    assert response.header("x-empty") is None  # an empty value removes the field


@pytest.mark.parametrize(("host", "headers"), [
    ("front.test\rInjected: 1", []),
    ("front.test\x00Injected: 1", []),
    ("front.test", [("X-Forwarded-For", "1.2.3.4\x00Injected: 1")]),
    ("front.test", [("X-Forwarded-For", "1.2.3.4\rInjected: 1")]),
], ids=["host-cr", "host-nul", "client-nul", "client-cr"])
def test_control_bytes_never_reach_a_rule(make_proxy: MakeProxy, upstream: Upstream, rid: str,
                                          host: str, headers: list[tuple[str, str]]) -> None:
    """A variable fed by what the client sent ({host}, {client} from a trusted
    X-Forwarded-For) cannot carry CR, LF or NUL upstream: refused before any rule."""
    proxy = make_proxy(*TRUST, "--header-up", "X-Via: {host} {client}")
    raw = request_bytes("GET", "/h", [("x-req-id", rid), *headers], host=host)
    response = exchange(proxy.port, raw)
    assert response.status == 400
    assert upstream.find(rid) is None
    assert not any(b"Injected" in value for rec in upstream.records for _, value in rec.headers)


def test_rule_values_are_checked_by_the_wire_rules() -> None:
    """Per request, a rendered value with CR/LF/NUL (or a bad Host) is a 400, never sent."""
    rule = parse_rule("X-Via: {host}", "up")
    host_rule = parse_rule("Host: {host}", "up")
    for bad in (b"a\r\nInjected: 1", b"a\nb", b"a\x00b"):
        with pytest.raises(BadRequest):
            apply([], (rule,), {"host": bad})
    with pytest.raises(BadRequest):
        apply([], (host_rule,), {"host": b"a b"})
    assert apply([(b"x-via", b"old"), (b"x-via", b"old2")], (rule,),
                 {"host": b"h:1"}) == [(b"x-via", b"h:1")]


@pytest.mark.parametrize(("options", "message"), [
    ({"header_up": ["X: {nope}"]}, "unknown variable {nope}"),
    ({"header_up": ["X: {request_id}"]}, "request ids are off"),
    ({"header_up": ["Content-Length: 1"]}, "cannot be changed"),
    ({"header_up": ["Transfer-Encoding: chunked"]}, "cannot be changed"),
    ({"header_up": ["-Connection"]}, "cannot be changed"),
    ({"header_up": ["+Host: a"]}, "can only be set"),
    ({"header_up": ["Host: a b"]}, "not a valid Host"),
    ({"header_up": ["X: a\r\nInjected: 1"]}, "CR, LF or NUL"),
    ({"header_up": ["X a"]}, "write 'Name: value'"),
    ({"header_up": ["-X: a"]}, "takes no value"),
    ({"header_up": ["X: {"]}, "a lone"),
    ({"header_down": ["Server: x"]}, "each server writes its own"),
    ({"header_down": ["Host: x"]}, "Host is a request header"),
])
def test_bad_rules_are_refused_at_start(options: dict[str, list[str]], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        ProxyConfig.build("http://127.0.0.1:9", **options)


def test_a_bad_rule_stops_serve_with_its_reason() -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "dualproxy", "serve", "--upstream",
                           "http://127.0.0.1:9", "--header-up", "X: {clinet}"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "unknown variable {clinet}" in done.stderr


# --- X-Forwarded-Prefix ---------------------------------------------------------------------

@pytest.mark.parametrize(("flags", "inbound", "expected"), [
    (("--mount", "/api"), None, ["/api"]),
    (("--mount", "/api"), "/evil", ["/api"]),                   # untrusted: dropped
    (("--mount", "/api", *TRUST), "/outer/", ["/outer/api"]),   # trusted: ours appended
    (("--mount", "/api", *TRUST), "not-a-path", ["/api"]),
    (("--mount", "/api", "--no-forwarded-prefix"), None, []),
    ((), None, []),                                             # no mount: none
    ((), "/evil", []),
    (TRUST, "/outer", ["/outer"]),                              # no mount, trusted: as it came
], ids=["mount", "mount-untrusted", "mount-trusted", "trusted-bad", "off", "no-mount",
        "no-mount-untrusted", "no-mount-trusted"])
def test_forwarded_prefix(make_proxy: MakeProxy, upstream: Upstream, rid: str,
                          flags: tuple[str, ...], inbound: str | None,
                          expected: list[str]) -> None:
    proxy = make_proxy(*flags)
    target = "/api/h" if "/api" in flags else "/h"
    headers = [] if inbound is None else [("X-Forwarded-Prefix", inbound)]
    assert send(proxy, rid, headers, target=target).status == 200
    assert upstream.wait_record(rid).header_all("x-forwarded-prefix") == expected


# --- request ids ----------------------------------------------------------------------------

def _ids(upstream: Upstream, rid: str, response_id: str | None) -> str:
    """The id the upstream got, checked to be the one returned (one line each way)."""
    record = upstream.wait_record(rid)
    [sent] = record.header_all("x-request-id")
    assert sent == response_id
    return sent


def test_request_id_generated_and_returned(make_proxy: MakeProxy, upstream: Upstream,
                                           rid: str) -> None:
    proxy = make_proxy("--request-id")
    first = send(proxy, rid + "-1", [("X-Request-ID", "client-chosen")])  # untrusted
    second = send(proxy, rid + "-2")
    one = _ids(upstream, rid + "-1", first.header("x-request-id"))
    two = _ids(upstream, rid + "-2", second.header("x-request-id"))
    assert HEX_ID.match(one) and HEX_ID.match(two) and one != two
    assert len(first.header_all("x-request-id")) == 1


def test_request_id_replaces_the_upstream_s(make_proxy: MakeProxy, upstream: Upstream,
                                            rid: str) -> None:
    proxy = make_proxy("--request-id")
    response = upstream_answers(proxy, rid, [["X-Request-ID", "upstream-own"],
                                             ["Content-Length", "0"]])
    assert HEX_ID.match(_ids(upstream, rid, response.header("x-request-id")))
    assert response.header_all("x-request-id") == [response.header("x-request-id")]


@pytest.mark.parametrize(("inbound", "kept"), [
    (["trace-7f3a:01"], True),
    (["a" * 200], True),
    (["a" * 201], False),
    (["has space"], False),
    (["one", "two"], False),
    ([], False),
], ids=["kept", "longest", "too-long", "space", "two-lines", "none"])
def test_request_id_from_a_trusted_peer(make_proxy: MakeProxy, upstream: Upstream, rid: str,
                                        inbound: list[str], kept: bool) -> None:
    proxy = make_proxy("--request-id", *TRUST)
    response = send(proxy, rid, [("X-Request-ID", value) for value in inbound])
    sent = _ids(upstream, rid, response.header("x-request-id"))
    if kept:
        assert sent == inbound[0]
    else:
        assert HEX_ID.match(sent)


def test_request_id_in_the_access_log(make_proxy: MakeProxy, upstream: Upstream,
                                      rid: str) -> None:
    text = make_proxy("--request-id")
    js = make_proxy("--request-id", "--access-log-format", "json")
    plain = make_proxy()
    ids = {}
    for name, proxy in (("text", text), ("json", js), ("plain", plain)):
        response = send(proxy, f"{rid}-{name}", target=f"/log/{rid}/{name}")
        assert response.status == 200
        ids[name] = response.header("x-request-id")
    assert wait_until(lambda: f"/log/{rid}/text " in text.log()), text.log()
    [line] = [ln for ln in text.log().splitlines() if f"/log/{rid}/text " in ln]
    assert line.endswith(f" ok request_id={ids['text']}")
    assert wait_until(lambda: f"/log/{rid}/json" in js.log()), js.log()
    [entry] = [json.loads(ln) for ln in js.log().splitlines()
               if ln.startswith("{") and f"/log/{rid}/json" in ln]
    assert entry["request_id"] == ids["json"]
    assert ids["plain"] is None
    assert wait_until(lambda: f"/log/{rid}/plain " in plain.log()), plain.log()
    assert "request_id" not in next(ln for ln in plain.log().splitlines()
                                    if f"/log/{rid}/plain " in ln)


def test_acceptable_request_ids() -> None:
    assert acceptable(b"abc") and acceptable(b"!" * 200) and acceptable(b"~")
    for bad in (b"", b"a b", b"a\tb", b"\x7f", b"\xe9", b"x" * 201, b"one,two"):
        assert not acceptable(bad)


# --- a real app: FastAPI under a mount ----------------------------------------------------

@pytest.fixture(scope="module")
def prefixed_app(upstream: Upstream) -> Iterator[App]:
    app = uvicorn("tests.integration_apps:fastapi_prefixed", upstream)
    yield app
    app.stop()


def test_fastapi_builds_links_under_the_mount(make_proxy: MakeProxy,
                                              prefixed_app: App) -> None:
    proxy = make_proxy("--mount", "/api", upstream_url=prefixed_app.url)
    with httpx.Client(base_url=proxy.url, timeout=30) as client:
        data = client.get("/api/items/7").json()
        assert data["root_path"] == "/api"
        link = urlsplit(data["url"]).path
        assert link == "/api/items/7"
        assert client.get(link).json()["item"] == 7  # the link works through the proxy
        docs = client.get("/api/docs")
        assert docs.status_code == 200
        assert "'/api/openapi.json'" in docs.text
        schema = client.get("/api/openapi.json")
        assert schema.status_code == 200 and "/items/{item_id}" in schema.json()["paths"]


def test_fastapi_links_without_the_prefix_miss_the_mount(make_proxy: MakeProxy,
                                                         prefixed_app: App) -> None:
    """The control: with --no-forwarded-prefix the app's links leave the mount."""
    proxy = make_proxy("--mount", "/api", "--no-forwarded-prefix",
                       upstream_url=prefixed_app.url)
    data = httpx.get(proxy.url + "/api/items/7", timeout=30).json()
    assert urlsplit(data["url"]).path == "/items/7"


# --- the same from a config file --------------------------------------------------------------

@pytest.fixture(scope="session")
def filters_file(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> str:
    path = tmp_path_factory.mktemp("filters") / "filters.toml"
    path.write_text(f"""\
access_log_format = "json"

[[route]]
mount = "/api"
upstream = "{upstream.url}"
request_id = true
header_up = ["X-Real-IP: {{client}}", "-Cookie", "X-Rid: {{request_id}}"]
header_down = ["+Cache-Control: no-store"]

[[route]]
mount = "/quiet"
upstream = "{upstream.url}"
forwarded_prefix = false
""")
    return str(path)


def test_filters_from_a_config_file(make_proxy: MakeProxy, upstream: Upstream, rid: str,
                                    filters_file: str) -> None:
    proxy = make_proxy("--config", filters_file, upstream_url="")
    response = send(proxy, rid, [("Cookie", "a=1")], target="/api/h")
    assert response.status == 200
    assert response.header_all("cache-control") == ["no-store"]
    record = upstream.wait_record(rid)
    request_id = response.header("x-request-id")
    assert request_id is not None and HEX_ID.match(request_id)
    assert record.header_all("x-request-id") == record.header_all("x-rid") == [request_id]
    assert record.header_all("x-real-ip") == ["127.0.0.1"]
    assert record.header("cookie") is None
    assert record.header_all("x-forwarded-prefix") == ["/api"]
    assert wait_until(lambda: request_id in proxy.log()), proxy.log()

    quiet = send(proxy, rid + "-q", [("Cookie", "a=1")], target="/quiet/h")
    assert quiet.status == 200 and quiet.header("x-request-id") is None
    record = upstream.wait_record(rid + "-q")
    assert record.header("x-forwarded-prefix") is None and record.header("x-request-id") is None
    assert record.header_all("cookie") == ["a=1"]
