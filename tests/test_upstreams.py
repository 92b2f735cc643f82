"""Unit tests of the upstream forms (dualproxy/upstreams.py) and the pool options' checks."""

from __future__ import annotations

import pytest

from dualproxy.config import ProxyConfig
from dualproxy.upstreams import parse_upstream, parse_upstreams


@pytest.mark.parametrize(("text", "scheme", "host", "port", "base", "authority", "origin"), [
    ("http://a", "http", "a", 80, b"", b"a", "http://a"),
    ("http://a:80/x/", "http", "a", 80, b"/x", b"a", "http://a"),
    ("http://a:8080/x/y", "http", "a", 8080, b"/x/y", b"a:8080", "http://a:8080"),
    ("https://b", "https", "b", 443, b"", b"b", "https://b"),
    ("https://b:8443/", "https", "b", 8443, b"", b"b:8443", "https://b:8443"),
    ("http://[::1]:9000/api", "http", "::1", 9000, b"/api", b"[::1]:9000", "http://[::1]:9000"),
])
def test_url_forms(text: str, scheme: str, host: str, port: int, base: bytes,
                   authority: bytes, origin: str) -> None:
    up = parse_upstream(text)
    assert (up.scheme, up.host, up.port, up.base, up.authority, up.origin, up.socket_path) == (
        scheme, host, port, base, authority, origin, None)
    assert up.tls == (scheme == "https")


@pytest.mark.parametrize(("text", "path", "base"), [
    ("unix:/run/app.sock", "/run/app.sock", b""),
    ("unix:/run/app.sock:/base/", "/run/app.sock", b"/base"),
    ("unix:/tmp/x.sock:/a/b", "/tmp/x.sock", b"/a/b"),
    ("unix:./rel.sock", "./rel.sock", b""),
])
def test_unix_forms(text: str, path: str, base: bytes) -> None:
    up = parse_upstream(text)
    assert (up.scheme, up.socket_path, up.base, up.authority, up.origin) == (
        "unix", path, base, b"localhost", "http://localhost")
    assert str(up) == f"unix:{path}"


@pytest.mark.parametrize(("text", "message"), [
    ("ftp://a", "http(s) URL or unix"),
    ("a:80", "http(s) URL or unix"),
    ("http://", "http(s) URL or unix"),
    ("http://a/?q=1", "query or fragment"),
    ("http://u:p@a/", "credentials"),
    ("http://a:99999", "bad port"),
    ("unix:", "socket path"),
    ("unix:relative.sock", "socket path"),
    ("http://a/caf\u00e9", "ASCII"),
])
def test_bad_forms_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_upstream(text)


def test_a_pool_shares_one_base_and_has_no_duplicates() -> None:
    pool = parse_upstreams(["http://a:1/b", "unix:/s.sock:/b", "https://c/b/"])
    assert [u.scheme for u in pool] == ["http", "unix", "https"]
    with pytest.raises(ValueError, match="share one base path"):
        parse_upstreams(["http://a:1/b", "http://c:2/other"])
    with pytest.raises(ValueError, match="given twice"):
        parse_upstreams(["http://a:1/b", "http://a:1/b/"])
    with pytest.raises(ValueError, match="at least one"):
        parse_upstreams([])


def test_config_takes_one_or_several_upstreams() -> None:
    one = ProxyConfig.build("http://a:1/b")
    assert one.upstream == "http://a:1/b" and len(one.upstreams) == 1
    several = ProxyConfig.build(["http://a:1/b", "http://c:2/b"])
    assert several.upstream == ("http://a:1/b", "http://c:2/b")
    assert several.upstream_authority == b"a:1" and several.upstream_base == b"/b"


@pytest.mark.parametrize(("options", "message"), [
    ({"balance": "fastest"}, "balance must be one of"),
    ({"max_fails": -1}, "max_fails and retries"),
    ({"retries": -1}, "max_fails and retries"),
    ({"fail_timeout": 0}, "fail_timeout must be more than 0"),
    ({"health_interval": -1}, "health_interval must be more than 0"),
    ({"health_path": "health"}, "health_path must start"),
    ({"cert": "/c.pem"}, "needs an https upstream"),
])
def test_bad_pool_options(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ProxyConfig.build("http://a:1", **options)
