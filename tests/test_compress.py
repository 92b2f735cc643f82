"""The compression filter (`--compress`) on every pairing: negotiation by q-values, what
is never compressed, the headers it fixes (Vary, ETag, framing), and streams that stay
live (each SSE event decodable before the upstream sends the next).

The bodies are read raw (httpx's `iter_raw`, or the raw socket client) and decoded here
with the codings' own libraries, never with the proxy's code.
"""

from __future__ import annotations

import gzip
import json
import uuid
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import brotli
import httpx
import pytest
import zstandard

from dualproxy import ProxyConfig
from dualproxy.filters.compress import Compression, negotiate
from tests.conftest import MakeProxy, ProxyPool, ProxyProcess
from tests.rawhttp import Reader, connect, read_response
from tests.upstream import Upstream, pattern_bytes, text_bytes

ALL = "gzip, deflate, br, zstd"  # what Chromium sends


def _decode_whole(coding: str | None, data: bytes) -> bytes:
    if coding is None:
        return data
    if coding == "gzip":
        return gzip.decompress(data)
    if coding == "br":
        return bytes(brotli.decompress(data))
    assert coding == "zstd"
    return bytes(zstandard.ZstdDecompressor().decompressobj().decompress(data))


def _stream_decoder(coding: str) -> Callable[[bytes], bytes]:
    """Chunk in, what is decodable so far out: a client decoding as bytes arrive."""
    if coding == "gzip":
        z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        return lambda chunk: z.decompress(chunk)
    if coding == "br":
        b = brotli.Decompressor()
        return lambda chunk: bytes(b.process(chunk))
    d = zstandard.ZstdDecompressor().decompressobj()
    return lambda chunk: bytes(d.decompress(chunk))


def _get(proxy: ProxyProcess, action: str, accept: str | None = ALL, *,
         method: str = "GET", headers: dict[str, str] | None = None,
         upstream_headers: list[list[str]] | None = None) -> tuple[httpx.Response, bytes]:
    """One request; the response and its body bytes as they came (not decoded)."""
    sent = {"x-upstream": action, "x-req-id": uuid.uuid4().hex, **(headers or {})}
    if upstream_headers is not None:
        sent["x-upstream-headers"] = json.dumps(upstream_headers)
    with proxy.client() as client:
        del client.headers["accept-encoding"]
        if accept is not None:
            sent["accept-encoding"] = accept
        with client.stream(method, "/compress", headers=sent) as response:
            return response, b"".join(response.iter_raw())


def _coding(response: httpx.Response) -> str | None:
    return response.headers.get("content-encoding")


@pytest.fixture
def compressing(make_proxy: MakeProxy) -> ProxyProcess:
    return make_proxy("--compress")


# -- negotiation ----------------------------------------------------------------------------

@pytest.mark.parametrize(("accept", "coding"), [
    (ALL, "zstd"),                                # ties: zstd > br > gzip
    ("gzip, br", "br"),
    ("gzip", "gzip"),
    ("x-gzip", "gzip"),                           # RFC 9110 8.4.1.3
    ("br;q=0.5, gzip;q=0.8", "gzip"),             # the client's q wins over our order
    ("zstd;q=0.2, br;q=0.9, gzip;q=0.9", "br"),   # a tie at the top: our order
    ("*", "zstd"),
    ("*;q=0.1, gzip;q=0.5", "gzip"),
    ("zstd;q=0, br;q=0, *", "gzip"),              # q=0 refuses; * covers the rest
    ("gzip, identity;q=0", "gzip"),
    ("identity;q=0", None),                       # nothing acceptable: identity (as nginx)
    ("*;q=0", None),
    ("gzip;q=0.5, identity", None),               # the client prefers identity
    ("deflate", None),                            # not a coding we offer
    ("", None),                                   # empty: no coding wanted
    (None, None),                                 # no Accept-Encoding: no preference
    ("gzip;q=2, br;q=abc", None),                 # invalid qvalues: those entries ignored
])
@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "length"])
def test_the_coding_follows_the_q_values_and_decodes_to_the_upstreams_bytes(
        compressing: ProxyProcess, accept: str | None, coding: str | None,
        chunked: bool) -> None:
    size = 200_000
    action = f"download size={size} text=1 ctype=text/html chunk=16384"
    response, raw = _get(compressing, action + (" chunked=1" if chunked else ""), accept)
    assert response.status_code == 200
    assert _coding(response) == coding
    assert "Accept-Encoding" in response.headers.get("vary", "")
    assert _decode_whole(coding, raw) == text_bytes(size)
    if coding is not None:
        assert "content-length" not in response.headers
        assert len(raw) < size // 3
        assert "accept-ranges" not in response.headers
    elif not chunked:
        assert response.headers["content-length"] == str(size)


def test_negotiation_ignores_case_spaces_and_repeated_fields() -> None:
    offered = (b"zstd", b"br", b"gzip")
    assert negotiate([b" GZip ; Q=0.5 ", b"BR;q=0.4"], offered) == b"gzip"
    assert negotiate([b"br;q=0", b"br"], offered) == b"br"
    assert negotiate([b"gzip;q=1.000, br;q=0.999"], offered) == b"gzip"
    assert negotiate([b"gzip;q=1.0001"], offered) is None
    assert negotiate([b",,gzip,,"], offered) == b"gzip"
    assert negotiate([b"br"], (b"gzip",)) is None  # br not offered (no brotli)


def test_without_compress_nothing_is_encoded(make_proxy: MakeProxy) -> None:
    response, raw = _get(make_proxy(), "download size=50000 text=1 ctype=text/html")
    assert _coding(response) is None and "vary" not in response.headers
    assert raw == text_bytes(50_000)


# -- what is left as it is ----------------------------------------------------------------

def _headers_action(compressing: ProxyProcess, fields: list[list[str]], *, status: int = 200,
                    length: int = 2000, method: str = "GET", accept: str | None = ALL,
                    ) -> tuple[httpx.Response, bytes]:
    """The upstream answers these fields and `length` bytes of `o`."""
    return _get(compressing, f"headers status={status}", accept, method=method,
                upstream_headers=[*fields, ["Content-Length", str(length)]])


HTML = ["Content-Type", "text/html; charset=utf-8"]


def test_no_transform_is_left_alone(compressing: ProxyProcess) -> None:
    response, raw = _headers_action(compressing,
                                    [HTML, ["Cache-Control", "public, No-Transform"]])
    assert _coding(response) is None and raw == b"o" * 2000
    assert response.headers["content-length"] == "2000"


def test_a_206_part_is_left_alone(compressing: ProxyProcess) -> None:
    response, raw = _headers_action(compressing,
                                    [HTML, ["Content-Range", "bytes 0-1999/9000"]], status=206)
    assert response.status_code == 206
    assert _coding(response) is None and raw == b"o" * 2000
    assert response.headers["content-length"] == "2000"


def test_a_range_request_is_not_compressed(compressing: ProxyProcess) -> None:
    # The upstream ignores the Range and answers the whole body: still identity, so a
    # later Range on the same URL names the same bytes.
    response, raw = _get(compressing, "download size=50000 text=1 ctype=text/html",
                         headers={"range": "bytes=0-99"})
    assert response.status_code == 200
    assert _coding(response) is None and raw == text_bytes(50_000)


def test_head_is_not_encoded_but_varies(compressing: ProxyProcess) -> None:
    response, raw = _get(compressing, "download size=50000 text=1 ctype=text/html",
                         method="HEAD")
    assert response.status_code == 200 and raw == b""
    assert _coding(response) is None
    assert response.headers["content-length"] == "50000"
    assert response.headers["vary"] == "Accept-Encoding"


def test_304_is_left_alone(compressing: ProxyProcess) -> None:
    response, raw = _headers_action(compressing, [HTML, ["ETag", '"v1"']], status=304,
                                    length=0)
    assert response.status_code == 304 and raw == b""
    assert _coding(response) is None and response.headers["etag"] == '"v1"'


def test_an_encoded_body_passes_as_it_came(compressing: ProxyProcess) -> None:
    response, raw = _get(compressing, "download size=50000 text=1 gzip=1 ctype=text/html")
    assert _coding(response) == "gzip"
    assert raw == gzip.compress(text_bytes(50_000), mtime=0)
    assert "vary" not in response.headers


@pytest.mark.parametrize(("length", "compressed"), [(0, False), (1023, False), (1024, True)])
def test_a_small_body_is_left_alone(compressing: ProxyProcess, length: int,
                                    compressed: bool) -> None:
    response, raw = _headers_action(compressing, [HTML], length=length)
    assert _coding(response) == ("zstd" if compressed else None)
    assert _decode_whole(_coding(response), raw) == b"o" * length


@pytest.mark.parametrize(("ctype", "compressed"), [
    ("image/png", False), ("image/jpeg", False), ("video/mp4", False),
    ("application/zip", False), ("application/octet-stream", False), ("font/woff2", False),
    ("image/svg+xml", True), ("application/json; charset=utf-8", True),
    ("application/problem+json", True), ("text/css", True), ("application/javascript", True),
    ("application/wasm", True), ("application/rss+xml", True),
])
def test_only_compressible_types_are_compressed(compressing: ProxyProcess, ctype: str,
                                                compressed: bool) -> None:
    # Text bytes whatever the type says: the type alone decides.
    response, raw = _get(compressing, f"download size=50000 text=1 ctype='{ctype}'", "br")
    assert _coding(response) == ("br" if compressed else None)
    assert ("vary" in response.headers) == compressed
    assert _decode_whole(_coding(response), raw) == text_bytes(50_000)


def test_incompressible_bytes_of_a_text_type_still_arrive_whole(
        compressing: ProxyProcess) -> None:
    response, raw = _get(compressing, "download size=300000 ctype=text/plain chunked=1",
                         "gzip")
    assert _coding(response) == "gzip"
    assert _decode_whole("gzip", raw) == pattern_bytes(300_000)


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "length"])
def test_an_upstream_cut_short_is_never_a_complete_compressed_body(
        compressing: ProxyProcess, chunked: bool) -> None:
    """The encoder's end mark is written only after the upstream's last byte: a cut
    upstream leaves the client a chunked body without its last chunk (aborted)."""
    action = f"cut size=300000 after=100000 ctype=text/plain{' chunked=1' * chunked}"
    with connect(compressing.port) as sock:
        sock.sendall(b"GET /cut HTTP/1.1\r\nHost: proxy.test\r\nAccept-Encoding: gzip\r\n"
                     b"X-Upstream: " + action.encode() + b"\r\n\r\n")
        response = read_response(Reader(sock))
    assert response.header("content-encoding") == "gzip"
    assert response.framing == "chunked" and not response.complete
    partial = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(response.body)
    assert partial == pattern_bytes(300_000)[:len(partial)] and len(partial) <= 100_000


# -- the headers it fixes -----------------------------------------------------------------

@pytest.mark.parametrize(("vary", "expected"), [
    (["Origin"], ["Origin, Accept-Encoding"]),
    (["Origin, Cookie"], ["Origin, Cookie, Accept-Encoding"]),
    (["accept-encoding"], ["accept-encoding"]),
    (["Origin, Accept-Encoding"], ["Origin, Accept-Encoding"]),
    (["*"], ["*"]),
])
@pytest.mark.parametrize("accept", [ALL, "identity"])
def test_vary_is_merged(compressing: ProxyProcess, vary: list[str], expected: list[str],
                        accept: str) -> None:
    response, _ = _headers_action(compressing, [HTML, *(["Vary", v] for v in vary)],
                                  accept=accept)
    assert response.headers.get_list("vary") == expected


@pytest.mark.parametrize(("etag", "accept", "expected"), [
    ('"abc"', ALL, 'W/"abc"'),        # the bytes differ: weak (RFC 9110 8.8.1)
    ('W/"abc"', ALL, 'W/"abc"'),
    ('"abc"', "identity", '"abc"'),   # not compressed: the upstream's bytes, strong
])
def test_etag_is_weakened_when_compressed(compressing: ProxyProcess, etag: str, accept: str,
                                          expected: str) -> None:
    response, raw = _headers_action(compressing, [HTML, ["ETag", etag]], accept=accept)
    assert response.headers["etag"] == expected
    assert _decode_whole(_coding(response), raw) == b"o" * 2000


def test_stale_fields_of_the_identity_bytes_are_dropped(compressing: ProxyProcess) -> None:
    response, _ = _headers_action(compressing, [HTML, ["Accept-Ranges", "bytes"],
                                                ["Content-MD5", "xyz"],
                                                ["Content-Encoding", "identity"]])
    assert response.headers.get_list("content-encoding") == ["zstd"]
    assert "accept-ranges" not in response.headers and "content-md5" not in response.headers


def test_an_http10_client_gets_a_close_delimited_compressed_body(
        compressing: ProxyProcess) -> None:
    with connect(compressing.port) as sock:
        sock.sendall(b"GET /c HTTP/1.0\r\nHost: proxy.test\r\nAccept-Encoding: gzip\r\n"
                     b"X-Upstream: download size=100000 text=1 ctype=text/plain\r\n\r\n")
        response = read_response(Reader(sock))
    assert response.status == 200 and response.header("content-encoding") == "gzip"
    assert "content-length" not in response.names()
    assert gzip.decompress(response.body) == text_bytes(100_000)
    assert response.framing == "close"


def test_a_sub_filter_rewrite_is_compressed_again(make_proxy: MakeProxy) -> None:
    """sub_filter decodes the upstream's gzip body to rewrite it; compress, outside it,
    encodes the rewritten body in the client's coding."""
    proxy = make_proxy("--compress", "--sub-filter", "proxy=PROXY")
    response, raw = _get(proxy, "download size=50000 text=1 gzip=1 ctype=text/html", "br")
    assert _coding(response) == "br"
    assert _decode_whole("br", raw) == text_bytes(50_000).replace(b"proxy", b"PROXY")


# -- live streams -------------------------------------------------------------------------

@pytest.mark.parametrize("coding", ["zstd", "br", "gzip"])
def test_sse_events_arrive_compressed_and_live(compressing: ProxyProcess, upstream: Upstream,
                                               coding: str) -> None:
    """The upstream sends an event and waits for the client to have decoded it before it
    sends the next: a proxy (or an encoder) that held bytes back would time out here."""
    gate, count = uuid.uuid4().hex, 4
    timeout = httpx.Timeout(30.0, read=10.0)
    with httpx.Client(base_url=compressing.url, timeout=timeout) as client, client.stream(
            "GET", "/events", headers={"x-upstream": f"sse count={count} gate={gate}",
                                       "accept-encoding": coding}) as response:
        assert _coding(response) == coding
        assert response.headers["content-type"] == "text/event-stream"
        decode = _stream_decoder(coding)
        chunks: Iterator[bytes] = response.iter_raw()
        text = b""
        for i in range(count):
            event = f"data: event-{i}\n\n".encode()
            while event not in text:
                text += decode(next(chunks))
            upstream.gate(f"{gate}-{i}").set()  # decoded: the upstream may send the next
        assert text == b"".join(f"data: event-{i}\n\n".encode() for i in range(count))
        assert b"".join(decode(chunk) for chunk in chunks) == b""


# -- the config file and the Python API --------------------------------------------------

def test_compress_per_route_in_a_config_file(pairing: str, proxy_pool: ProxyPool,
                                             upstream: Upstream, tmp_path: Path) -> None:
    path = tmp_path / "routes.toml"
    path.write_text(f'[[route]]\nmount = "/z"\nupstream = "{upstream.url}"\ncompress = true\n\n'
                    f'[[route]]\nmount = "/plain"\nupstream = "{upstream.url}"\n')
    routed = proxy_pool.get(pairing, "", ("--config", str(path)))
    action = {"x-upstream": "download size=5000 text=1 ctype=text/plain"}
    with routed.client() as client:
        compressed = client.get("/z/x", headers={**action, "accept-encoding": "br"})
        plain = client.get("/plain/x", headers={**action, "accept-encoding": "br"})
    assert compressed.headers["content-encoding"] == "br"
    assert compressed.content == plain.content == text_bytes(5000)  # httpx decodes br
    assert "content-encoding" not in plain.headers



@pytest.mark.parametrize(("settings", "coding"), [
    (Compression(min_length=10, codings=["gzip"]), "gzip"),   # only gzip offered
    (Compression(min_length=10, types=["text/*"]), None),     # JSON not in the types
    (Compression(), None),                                    # the echo: under 1 KiB
])
def test_a_compression_settings_object_on_both_faces(upstream: Upstream,
                                                     settings: Compression,
                                                     coding: str | None) -> None:
    from tests.test_api import _get_both

    config = ProxyConfig.build(upstream.url, compress=settings)
    for response in _get_both(config, "/settings"):  # httpx accepts zstd, br and gzip
        assert response.status_code == 200
        assert response.headers.get("content-encoding") == coding
        assert response.json()["target"] == "/settings"


@pytest.mark.parametrize(("value", "message"), [
    ({"min_length": -1}, "min_length"),
    ({"types": "text/html"}, "list of strings"),
    ({"types": ["html"]}, "not a media type"),
    ({"codings": ["deflate"]}, "unknown"),
    ({"types": [b"text/html"]}, "lists of strings"),
])
def test_bad_compression_settings_are_refused(value: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Compression(**value)


def test_compress_takes_a_bool_or_settings() -> None:
    with pytest.raises(ValueError, match="compress must be"):
        ProxyConfig.build("http://u", compress="yes")
    assert ProxyConfig.build("http://u", compress=True).compress is True
