"""Body transforms on every face x server pairing, behind a real server, in front of the
recording upstream (tests/upstream.py, its `pieces` action: a body in several writes).

The Python-API proxy is tests/filter_serve.py (one filter per `x-filter` value); the
`sub_filter` option is also checked as `--sub-filter` and as a config file's table.
The transforms themselves, without servers: tests/test_transforms.py.
"""

from __future__ import annotations

import base64
import gzip
import json
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import brotli  # type: ignore[import-untyped]
import pytest
import zstandard

from tests.conftest import ProxyPool, ProxyProcess
from tests.filter_serve import LIMIT
from tests.rawhttp import RawResponse, exchange, request_bytes, wait_until
from tests.upstream import Upstream

URL = b"http://upstream:8080"
PUBLIC = b"https://public.example"


class FilteredProxy(ProxyProcess):
    module = "tests.filter_serve"


@pytest.fixture(scope="module")
def filtered(pairing: str, upstream: Upstream) -> Iterator[FilteredProxy]:
    proxy = FilteredProxy(pairing, upstream.url, ())
    yield proxy
    proxy.stop()


def pieces_request(rid: str, pieces: list[bytes], *, flt: str | None = "sub",
                   params: str = "", method: str = "GET") -> bytes:
    headers = [("x-req-id", rid), ("x-upstream", f"pieces {params}".strip()),
               ("x-upstream-pieces", json.dumps([base64.b64encode(p).decode() for p in pieces]))]
    if flt is not None:
        headers.append(("x-filter", flt))
    return request_bytes(method, f"/t/{rid}", headers)


def get(proxy: ProxyProcess, rid: str, pieces: list[bytes], **kwargs: str | None) -> RawResponse:
    response = exchange(proxy.port, pieces_request(rid, pieces, **kwargs))  # type: ignore[arg-type]
    assert response.complete, response
    return response


def page_split_inside(pattern: bytes, at: int) -> tuple[list[bytes], bytes]:
    """A page in two writes cut `at` bytes into `pattern`, and the page whole."""
    page = b'<a href="' + pattern + b'/docs">docs</a> and ' + pattern + b"/x\n"
    cut = page.index(pattern) + at
    return [page[:cut], page[cut:]], page


# -- sub_filter ---------------------------------------------------------------------------


@pytest.mark.parametrize("chunked", ["0", "1"])
def test_sub_filter_replaces_a_pattern_split_between_two_writes(
        filtered: FilteredProxy, rid: str, chunked: str) -> None:
    pieces, page = page_split_inside(URL, len(URL) // 2)
    response = get(filtered, rid, pieces, params=f"chunked={chunked}")
    assert response.status == 200
    assert response.body == page.replace(URL, PUBLIC)
    assert response.header("content-length") is None  # the length changed: not the upstream's
    assert response.framing == "chunked"


def test_sub_filter_to_an_http10_client_ends_with_the_close(
        filtered: FilteredProxy, rid: str) -> None:
    """HTTP/1.0 has no chunked coding: a body whose length changed ends with the
    connection (uvicorn's httptools protocol chunked it: servers/uvicorn_protocols.py)."""
    pieces, page = page_split_inside(URL, 5)
    raw = pieces_request(rid, pieces).replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1)
    response = exchange(filtered.port, raw)
    assert response.status == 200 and response.framing == "close"
    assert response.body == page.replace(URL, PUBLIC)


def test_sub_filter_streams_the_text_before_a_split_pattern(filtered: FilteredProxy,
                                                            rid: str) -> None:
    """What comes before the held-back beginning of a pattern reaches the client while
    the upstream waits to send the rest (a transform streams, it does not buffer)."""
    pieces, page = page_split_inside(URL, 4)
    with filtered.client() as client:
        started = time.monotonic()
        with client.stream("GET", f"/t/{rid}", headers={
                "x-req-id": rid, "x-filter": "sub", "x-upstream": "pieces interval=2",
                "x-upstream-pieces": json.dumps([base64.b64encode(p).decode()
                                                 for p in pieces])}) as response:
            stream = response.iter_raw()
            first = next(stream)
            first_at = time.monotonic() - started
            body = first + b"".join(stream)
        total = time.monotonic() - started
    assert body == page.replace(URL, PUBLIC)
    assert first == page[:page.index(URL)]  # up to the pattern's beginning, held back
    assert first_at < 1.5 <= total


def test_sub_filter_leaves_other_types_and_unselected_requests(filtered: FilteredProxy,
                                                               rid: str) -> None:
    pieces, page = page_split_inside(URL, 3)
    plain = get(filtered, rid + "-a", pieces, params="ctype=text/plain")
    assert plain.body == page and plain.header("content-length") == str(len(page))
    unselected = get(filtered, rid + "-b", pieces, flt=None)
    assert unselected.body == page and unselected.header("content-length") == str(len(page))


def test_sub_filter_rewrites_an_answer_given_by_a_filter(filtered: FilteredProxy,
                                                        upstream: Upstream, rid: str) -> None:
    response = get(filtered, rid, [b"unused"], flt="answered")
    assert response.body == b'<a href="https://public.example/">home</a>'
    assert upstream.find(rid) is None  # answered without the upstream


def test_sub_filter_leaves_a_head_request(filtered: FilteredProxy, rid: str) -> None:
    pieces, page = page_split_inside(URL, 3)
    response = exchange(filtered.port, pieces_request(rid, pieces, method="HEAD"))
    assert response.status == 200 and response.body == b""
    assert response.header("content-length") == str(len(page))


# -- decoding -----------------------------------------------------------------------------

TEXT = b"the quick brown fox jumps over the lazy dog\n" * 40

ENCODERS = {
    "gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": brotli.compress,
    "zstd": zstandard.ZstdCompressor().compress,
}


@pytest.mark.parametrize("coding", ["gzip", "zstd", "br", "deflate"])
@pytest.mark.parametrize("chunked", ["0", "1"])
def test_a_decoded_transform_of_an_encoded_body(filtered: FilteredProxy, rid: str,
                                                coding: str, chunked: str) -> None:
    data = bytes(ENCODERS[coding](TEXT))
    third = len(data) // 3
    response = get(filtered, rid, [data[:third], data[third:2 * third], data[2 * third:]],
                   flt="upper", params=f"ctype=text/plain encoding={coding} chunked={chunked} "
                                       "interval=0.05")
    assert response.status == 200
    assert response.body == TEXT.upper()
    assert response.header("content-encoding") is None
    assert response.header("content-length") is None


def test_a_sub_filter_on_a_gzip_page(filtered: FilteredProxy, rid: str) -> None:
    _, page = page_split_inside(URL, 0)
    data = gzip.compress(page * 20)
    response = get(filtered, rid, [data[:40], data[40:]], params="encoding=gzip")
    assert response.body == page.replace(URL, PUBLIC) * 20
    assert response.header("content-encoding") is None


def test_a_body_that_does_not_decode_aborts_the_response(filtered: FilteredProxy,
                                                         rid: str) -> None:
    """Never ended as if complete: the client sees the body cut, not a short 200."""
    data = gzip.compress(TEXT)
    response = exchange(filtered.port, pieces_request(
        rid, [data[:50], b"\xff" * 40], flt="upper",
        params="ctype=text/plain encoding=gzip chunked=1 interval=0.05"))
    assert response.status == 200  # the head was gone before the bad bytes came
    assert not response.complete
    assert wait_until(lambda: any(rid in line and "upstream-broken" in line
                                  for line in filtered.log().splitlines()))
    assert any(rid in line and "TransformFailed" in line for line in filtered.log().splitlines())


# -- buffered -----------------------------------------------------------------------------


def test_a_json_edit_under_the_limit(filtered: FilteredProxy, rid: str) -> None:
    document = json.dumps({"id": 7, "name": "x"}).encode()
    assert len(document) < LIMIT
    response = get(filtered, rid, [document[:10], document[10:]], flt="json",
                   params="ctype=application/json")
    assert response.status == 200
    assert json.loads(response.body) == {"id": 7, "name": "x", "via": "dualproxy"}
    assert response.header("content-type") == "application/json"


def test_buffered_over_its_limit_with_a_length_passes_untouched(filtered: FilteredProxy,
                                                                rid: str) -> None:
    """Content-Length above the limit: decided at the head, the framing as it came."""
    body = b"x" * (LIMIT + 1)
    response = get(filtered, rid, [body[:20], body[20:]], flt="buffered",
                   params="ctype=text/plain")
    assert response.body == body
    assert response.header("content-length") == str(LIMIT + 1)
    assert response.framing == "content-length"


def test_buffered_over_its_limit_chunked_flushes_then_passes(filtered: FilteredProxy,
                                                             rid: str) -> None:
    body = b"y" * (LIMIT * 3)
    response = get(filtered, rid, [body[:LIMIT // 2], body[LIMIT // 2:LIMIT * 2],
                                   body[LIMIT * 2:]], flt="buffered",
                   params="ctype=text/plain chunked=1 interval=0.05")
    assert response.body == body
    assert response.framing == "chunked"


@pytest.mark.parametrize("chunked", ["0", "1"])
def test_buffered_under_its_limit_is_edited(filtered: FilteredProxy, rid: str,
                                            chunked: str) -> None:
    response = get(filtered, rid, [b"small", b" body"], flt="buffered",
                   params=f"ctype=text/plain chunked={chunked} interval=0.05")
    assert response.body == b"edited"
    assert response.header("content-length") is None


# -- request bodies -----------------------------------------------------------------------


def test_a_request_body_transform(filtered: FilteredProxy, upstream: Upstream,
                                  rid: str) -> None:
    body = b"hello upstream " * 100
    response = exchange(filtered.port, request_bytes("POST", f"/in/{rid}", [
        ("x-req-id", rid), ("x-filter", "request"), ("Content-Type", "text/plain")], body))
    assert response.status == 200
    record = upstream.wait_record(rid)
    assert record.body == body.upper()
    assert record.header("transfer-encoding") == "chunked"
    assert record.header("content-length") is None
    other = exchange(filtered.port, request_bytes("POST", f"/in/{rid}-json", [
        ("x-req-id", rid + "-json"), ("x-filter", "request"),
        ("Content-Type", "application/json")], b'{"a": "b"}'))
    assert other.status == 200
    assert upstream.wait_record(rid + "-json").body == b'{"a": "b"}'


# -- sub_filter on the command line and in a config file ----------------------------------


def test_sub_filter_flag(make_proxy: object, rid: str) -> None:
    proxy = make_proxy("--sub-filter", "http://upstream:8080=https://public.example",  # type: ignore[operator]
                       "--sub-filter", "lazy=busy", "--sub-filter-type", "text/*")
    pieces, page = page_split_inside(URL, 7)
    response = get(proxy, rid, [*pieces, b"the lazy dog"], flt=None, params="ctype=text/css")
    assert response.body == page.replace(URL, PUBLIC) + b"the busy dog"


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> Path:
    path = tmp_path_factory.mktemp("sub-filter") / "dualproxy.toml"
    path.write_text(f"""\
[[route]]
mount = "/rewritten"
upstream = "{upstream.url}"
sub_filter = {{ "http://upstream:8080" = "https://public.example", "a=b" = "c" }}

[[route]]
mount = "/listed"
upstream = "{upstream.url}"
sub_filter = ["upstream:8080=public.example:443"]
sub_filter_types = ["text/plain"]

[[route]]
mount = "/as-is"
upstream = "{upstream.url}"
""")
    return path


@pytest.mark.parametrize(("mount", "ctype", "expected"), [
    ("/rewritten", "text/html", b"go https://public.example/c"),
    ("/listed", "text/plain", b"go http://public.example:443/a=b"),
    ("/listed", "text/html", b"go http://upstream:8080/a=b"),
    ("/as-is", "text/html", b"go http://upstream:8080/a=b"),
])
def test_sub_filter_in_a_config_file(pairing: str, proxy_pool: ProxyPool, config_file: Path,
                                     rid: str, mount: str, ctype: str, expected: bytes) -> None:
    proxy = proxy_pool.get(pairing, "", ("--config", str(config_file)))
    response = exchange(proxy.port, pieces_request(rid, [b"go http://upstr", b"eam:8080/a=b"],
                                                   flt=None, params=f"ctype={ctype}")
                        .replace(f"GET /t/{rid}".encode(), f"GET {mount}/t/{rid}".encode()))
    assert response.status == 200 and response.complete
    assert response.body == expected
