"""Unit and property tests of the core's security rules (issue 16): routing on every
reading of the path, redirect rewriting, underscores, Forwarded, Host, the mount redirect.

The routing properties compare the core's decision with how real normalising
upstreams read the same target: werkzeug's dev server and routing, Starlette as
uvicorn feeds it, and Python's http.server `translate_path`.
"""

from __future__ import annotations

import posixpath
import urllib.parse
from http.server import SimpleHTTPRequestHandler
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from werkzeug.exceptions import NotFound
from werkzeug.routing import Map, RequestRedirect, Rule
from werkzeug.serving import WSGIRequestHandler

from dualproxy import AsyncProxy, AsyncRouter, SyncProxy, SyncRouter
from dualproxy.asgi import incoming_from_scope
from dualproxy.cli import load_config_file
from dualproxy.config import ProxyConfig
from dualproxy.core import IncomingRequest, plan_request
from dualproxy.errors import BadRequest, MountRedirect, NotProxied
from dualproxy.headers import request_headers, response_headers, well_formed_forwarded
from dualproxy.launch import config_from_options
from dualproxy.target import app_mount, choose_mount, under_mount
from dualproxy.wsgi import incoming_from_environ

ROUTES = (b"/admin", b"/api", b"/api/v2", b"")


def incoming(target: bytes, host: bytes = b"front.test", method: str = "GET",
             headers: list[tuple[bytes, bytes]] | None = None,
             peer: str = "10.0.0.1") -> IncomingRequest:
    return IncomingRequest(method=method, target=target,
                           headers=[(b"host", host), *(headers or [])], peer=peer)


# -- how normalising upstreams read a path -----------------------------------------------


def http_server_reading(path: bytes) -> bytes:
    """Python's http.server: the file it would serve, relative to its directory."""
    handler = SimpleNamespace(directory="/srv")
    served: str = SimpleHTTPRequestHandler.translate_path(  # type: ignore[arg-type]
        handler, path.decode("latin-1"))
    return served.removeprefix("/srv").rstrip("/").encode("latin-1", "surrogateescape") or b"/"


def werkzeug_reading(path: bytes) -> bytes:
    """werkzeug's dev server (PATH_INFO: `//x` re-joined, percent-decoded), then its
    routing (repeated slashes merged by a redirect)."""
    handler = SimpleNamespace(path=path.decode("latin-1"), client_address=("127.0.0.1", 1),
                              server=SimpleNamespace(ssl_context=None, multithread=False,
                                                     multiprocess=False, server_address=("h", 1)),
                              rfile=None, request_version="HTTP/1.1", command="GET",
                              headers={}, connection=None)
    try:
        environ = WSGIRequestHandler.make_environ(handler)  # type: ignore[arg-type]
        path_info: str = environ["PATH_INFO"]
    except Exception:  # the reading it cannot make is none we must agree with
        path_info = urllib.parse.unquote(path.decode("latin-1"))
    adapter = Map([Rule("/<path:p>", endpoint="any"), Rule("/", endpoint="root")]).bind("h")
    try:
        adapter.match(path_info)
    except RequestRedirect as redirect:
        path_info = urllib.parse.urlsplit(redirect.new_url).path
        path_info = urllib.parse.unquote(path_info)
    except NotFound:
        pass
    return path_info.encode("latin-1", "surrogateescape")


def starlette_reading(path: bytes) -> bytes:
    """Starlette's `scope["path"]` as uvicorn builds it: the raw path percent-decoded."""
    return urllib.parse.unquote(path.decode("ascii")).encode("latin-1", "surrogateescape")


def windows_reading(path: bytes) -> bytes:
    """A backend that takes `\\` for `/` (IIS, some Java servers), decoded and normalised."""
    decoded = urllib.parse.unquote_to_bytes(path).replace(b"\\", b"/")
    return b"/" + b"/".join(w for w in posixpath.normpath(decoded).split(b"/") if w)


def tomcat_reading(path: bytes) -> bytes:
    """Tomcat's order: `;params` cut from each segment, then decoded and normalised."""
    cut = b"/".join(segment.partition(b";")[0] for segment in path.split(b"/"))
    decoded = urllib.parse.unquote_to_bytes(cut)
    return b"/" + b"/".join(w for w in posixpath.normpath(decoded).split(b"/") if w)


READERS = (http_server_reading, werkzeug_reading, starlette_reading, windows_reading,
           tomcat_reading)


def longest(path: bytes, mounts: tuple[bytes, ...]) -> bytes | None:
    covering = [m for m in mounts if under_mount(path, m)]
    return max(covering, key=len) if covering else None


# -- the routing rule ------------------------------------------------------------------

BYPASSES = [b"/x/../admin/secret", b"//admin/secret", b"/%61dmin/secret", b"/admin%2fsecret",
            b"/admin%2Fsecret", b"/./admin/secret", b"/.%2fadmin/secret",
            b"/x/..\\admin/secret", b"/\\admin/secret", b"/admin\\secret",
            b"/x/%2e%2e/admin/secret", b"/x/..%2Fadmin/secret", b"/admin;x/secret",
            b"/admin/../x", b"/%2e/admin/secret", b"/x/..%5cadmin/secret",
            b"/x;y%2Fadmin/..%2Fadmin/secret"]  # Tomcat: `;params` cut, then decoded


@pytest.mark.parametrize("path", BYPASSES)
def test_a_path_that_reads_as_another_route_is_refused(path: bytes) -> None:
    with pytest.raises(BadRequest):
        choose_mount(path, (b"/admin", b""))


@pytest.mark.parametrize(("path", "mount"), [
    (b"/admin/secret", b"/admin"), (b"/admin", b"/admin"), (b"/adminx", b""),
    (b"/admin/a%2Fb", b"/admin"), (b"/admin/./x", b"/admin"), (b"/admin/a/../b", b"/admin"),
    (b"/x/a%2Fb", b""), (b"/.well-known/x", b""), (b"/static/app.js", b""),
    (b"/api/v4/projects/a%2Fb", b"/api"), (b"/api/v2/x", b"/api/v2"), (b"/api/v2x", b"/api"),
])
def test_plain_and_unambiguous_paths_keep_their_route(path: bytes, mount: bytes) -> None:
    assert choose_mount(path, ROUTES) == mount


def test_a_single_mount_refuses_what_only_reads_as_it() -> None:
    assert choose_mount(b"/other", (b"/api",)) is None
    for path in (b"/%61pi/x", b"/x/../api/y", b"//api/x", b"/api/../x"):
        with pytest.raises(BadRequest):
            choose_mount(path, (b"/api",))
    assert plan_request(ProxyConfig.build("http://u/base", mount="/api"),
                        incoming(b"/api/v4/projects/a%2Fb")).target == b"/base/v4/projects/a%2Fb"


_SEGMENT = st.sampled_from(["admin", "api", "v2", "x", ".", "..", "%2e", "%2E%2e", ".%2e",
                            "%61dmin", "%61pi", "", "a%2Fb", "admin%2fx", "%5c", "\\", "x;y",
                            "admin;x", "%2561dmin", "ADMIN", "%41dmin", "%7e"])
_SEPARATOR = st.sampled_from(["/", "/", "/", "//", "\\", "%2F", "%2f", "%5C"])
_PATHS = st.lists(st.tuples(_SEPARATOR, _SEGMENT), min_size=1, max_size=7).map(
    lambda parts: ("/" + "".join(sep + seg for sep, seg in parts)[1:]).encode())


@given(_PATHS, st.sampled_from([ROUTES, (b"/admin", b""), (b"/api",), (b"/api", b"/admin")]))
@settings(max_examples=1000, deadline=None)
def test_no_target_is_routed_unlike_a_normalising_upstream_reads_it(
        path: bytes, mounts: tuple[bytes, ...]) -> None:
    """Whatever the core routes (not refused), werkzeug, Starlette and http.server
    read as lying under that same mount (None: outside every mount, for all)."""
    try:
        chosen = choose_mount(path, mounts)
    except BadRequest:
        return
    for read in READERS:
        assert longest(read(path), mounts) == chosen, (read.__name__, read(path))


@pytest.mark.parametrize("router", ["async", "sync"])
@given(path=_PATHS)
@settings(max_examples=300, deadline=None)
def test_the_python_routers_route_as_upstreams_read(router: str, path: bytes) -> None:
    """AsyncRouter/SyncRouter pick a proxy whose own plan accepts the request only
    when every reader agrees on its mount."""
    kind, router_kind = (AsyncProxy, AsyncRouter) if router == "async" else (SyncProxy,
                                                                            SyncRouter)
    app = ROUTERS.get(router)
    if app is None:
        app = ROUTERS[router] = router_kind([kind(f"http://u{i}.test", mount=m.decode())
                                             for i, m in enumerate(ROUTES)])
    proxy = app.route(path)
    try:
        plan = proxy.plan(incoming(path))
    except (BadRequest, NotProxied, MountRedirect):
        return
    for read in READERS:
        assert longest(read(path), ROUTES) == plan.mount, (read.__name__, read(path))


ROUTERS: dict[str, AsyncRouter | SyncRouter] = {}


@pytest.mark.parametrize("path", BYPASSES)
def test_the_python_routers_refuse_the_bypasses(path: bytes) -> None:
    for app in (AsyncRouter([AsyncProxy("http://a.test", mount="/admin"),
                             AsyncProxy("http://b.test")]),
                SyncRouter([SyncProxy("http://a.test", mount="/admin"),
                            SyncProxy("http://b.test")])):
        with pytest.raises(BadRequest):
            app.route(path).plan(incoming(path))


# -- the mount without its slash ----------------------------------------------------------


@pytest.mark.parametrize(("method", "target", "status", "location"), [
    ("GET", b"/api", 301, b"/api/"),
    ("HEAD", b"/api?q=1&r", 301, b"/api/?q=1&r"),
    ("POST", b"/api", 308, b"/api/"),
    ("GET", b"http://front.test/api?x", 301, b"/api/?x"),
])
def test_the_mount_without_its_slash_redirects(method: str, target: bytes, status: int,
                                               location: bytes) -> None:
    config = ProxyConfig.build("http://u/base", mount="/api")
    with pytest.raises(MountRedirect) as info:
        plan_request(config, incoming(target, method=method))
    assert info.value.status == status
    assert info.value.headers() == [(b"location", location), (b"content-length", b"0")]
    assert plan_request(config, incoming(b"/api/")).target == b"/base/"


def test_an_app_owned_mount_is_not_redirected() -> None:
    """Inside an app (root_path/SCRIPT_NAME), the app routed the request: no redirect."""
    config = ProxyConfig.build("http://u/base")
    plan = plan_request(config, IncomingRequest(method="GET", target=b"/api",
                                                headers=[(b"host", b"h")], peer=None,
                                                mount=b"/api"))
    assert plan.target == b"/base"


# -- Location rewriting never leaves the host ---------------------------------------------


@pytest.mark.parametrize(("location", "expected"), [
    (b"/app//evil.example/x", b"/.//evil.example/x"),
    (b"/app/\\evil.example/x", b"/./\\evil.example/x"),
    (b"/app/\t/evil.example/x", b"/./\t/evil.example/x"),
    (b"/app/\\\\evil.example", b"/./\\\\evil.example"),
    (b"http://u:9/app//evil.example/x", b"/.//evil.example/x"),
    (b"/app/ok", b"/ok"),
    (b"/app", b"/"),
    (b"//evil.example/x", b"//evil.example/x"),  # the upstream's own, never ours: untouched
])
def test_a_rewritten_location_stays_on_this_host(location: bytes, expected: bytes) -> None:
    config = ProxyConfig.build("http://u:9/app")
    out = response_headers([(b"location", location), (b"content-location", location),
                            (b"refresh", b"0; url=" + location)], config, mount=b"")
    assert out == [(b"location", expected), (b"content-location", expected),
                   (b"refresh", b"0; url=" + expected)]


# -- request headers ------------------------------------------------------------------------


def test_underscore_names_are_dropped_unless_kept() -> None:
    sent = [(b"host", b"h"), (b"x_forwarded_for", b"6.6.6.6"), (b"x_api_key", b"k"),
            (b"x-ok", b"1")]
    out = request_headers(sent, ProxyConfig.build("http://u"), peer="10.0.0.1", scheme="http")
    assert not [n for n, _ in out if b"_" in n]
    assert (b"x-ok", b"1") in out and (b"x-forwarded-for", b"10.0.0.1") in out
    kept = request_headers(sent, ProxyConfig.build("http://u", underscores_in_headers=True),
                           peer="10.0.0.1", scheme="http")
    assert (b"x_api_key", b"k") in kept


@pytest.mark.parametrize(("value", "ok"), [
    (b"for=1.2.3.4", True), (b'for="[::1]";proto=http, for=unknown', True),
    (b'for="a\\"b"', True), (b"for=a;;by=b", True),
    (b'for="unterminated', False), (b'for="x;by=y', False), (b"for=a by=b", False),
    (b"for", False), (b'for="a\\', False),
])
def test_forwarded_grammar(value: bytes, ok: bool) -> None:
    assert well_formed_forwarded(value) is ok


def test_a_malformed_trusted_forwarded_cannot_swallow_ours() -> None:
    config = ProxyConfig.build("http://u", trusted_proxies=["10.0.0.0/8"])
    out = request_headers([(b"host", b"h"), (b"forwarded", b'for="6.6.6.6')], config,
                          peer="10.0.0.1", scheme="http")
    assert [v for n, v in out if n == b"forwarded"] == [b"for=10.0.0.1;host=h;proto=http"]
    out = request_headers([(b"host", b"h"), (b"forwarded", b"for=1.2.3.4")], config,
                          peer="10.0.0.1", scheme="http")
    assert [v for n, v in out if n == b"forwarded"] == [
        b"for=1.2.3.4, for=10.0.0.1;host=h;proto=http"]


@pytest.mark.parametrize("host", [b"", b":80"])
def test_an_empty_host_is_refused(host: bytes) -> None:
    with pytest.raises(BadRequest):
        plan_request(ProxyConfig.build("http://u"), incoming(b"/x", host=host))


def test_an_absolute_form_authority_is_the_clients_host() -> None:
    """RFC 9112 3.2.2: the target's authority, not Host, for X-Forwarded-Host, Forwarded
    and --preserve-host; the upstream connection stays the configured one."""
    for preserve in (False, True):
        config = ProxyConfig.build("http://u:9/base", preserve_host=preserve)
        plan = plan_request(config, incoming(b"http://user@evil.example:8/h",
                                             host=b"good.test"))
        headers = dict(plan.headers)
        assert plan.target == b"/base/h"
        assert headers[b"host"] == (b"evil.example:8" if preserve else b"u:9")
        assert headers[b"x-forwarded-host"] == b"evil.example:8"
        assert b'host="evil.example:8"' in headers[b"forwarded"]
    with pytest.raises(BadRequest):
        plan_request(ProxyConfig.build("http://u"), incoming(b"http:///h"))


def test_the_toml_key_keeps_underscores_per_route(tmp_path: Path) -> None:
    path = tmp_path / "routes.toml"
    path.write_text('[[route]]\nmount = "/a"\nupstream = "http://127.0.0.1:9"\n'
                    'underscores_in_headers = true\n\n'
                    '[[route]]\nupstream = "http://127.0.0.1:9"\n')
    _, routes = load_config_file(str(path), ["serve", "--config", str(path)])
    assert [config_from_options(r).underscores_in_headers for r in routes] == [True, False]


@pytest.mark.parametrize(("raw", "prefix", "mount"), [
    (b"/api/x", b"/api", b"/api"), (b"/api/x", b"/api/", b"/api"),
    (b"/%61pi/x", b"/api", b"/api"),     # the app decoded it: refused by the rule below
    (b"/x", b"/api", b""),               # a front proxy stripped the prefix
    (b"/x", b"", b""),
])
def test_an_app_mount_is_found_in_the_raw_path(raw: bytes, prefix: bytes, mount: bytes) -> None:
    assert app_mount(raw, prefix) == mount


def test_an_app_routed_prefix_spelled_otherwise_is_refused_on_both_faces() -> None:
    """`app.mount("/api", proxy)` (or SCRIPT_NAME) routed `/%61pi/x` on its decoded path:
    the raw target is not literally under that mount, so 400, not `/base/%61pi/x`."""
    config = ProxyConfig.build("http://u/base")
    scope = {"type": "http", "method": "GET", "path": "/api/x", "raw_path": b"/%61pi/x",
             "root_path": "/api", "query_string": b"", "headers": [(b"host", b"h")]}
    environ = {"REQUEST_METHOD": "GET", "RAW_URI": "/%61pi/x", "SCRIPT_NAME": "/api",
               "PATH_INFO": "/x", "HTTP_HOST": "h"}
    for request in (incoming_from_scope(scope), incoming_from_environ(environ)):
        assert request.mount == b"/api"
        with pytest.raises(BadRequest):
            plan_request(config, request)
