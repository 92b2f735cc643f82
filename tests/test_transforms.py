"""Body transforms for users (dualproxy/filters/transforms.py), without a server: the
streaming replacement at every chunk split, against whole-body references; Buffered
under and over its limit; the filters' decisions at the head; decoding failures.

The same filters under every face x server pairing: tests/test_body_transforms.py.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import brotli  # type: ignore[import-untyped]
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from dualproxy.cli import check_route, load_config_file
from dualproxy.config import ProxyConfig
from dualproxy.configfile import ConfigError
from dualproxy.core import IncomingRequest, ResponseHead, plan_request
from dualproxy.errors import TransformFailed
from dualproxy.filters import (
    Buffered,
    BufferedBody,
    Exchange,
    Replace,
    RequestBodyFilter,
    SubFilter,
    body_filter,
    build_chain,
    request_body_filter,
)
from dualproxy.filters.chain import BodyPipeline, Chain, run_sync
from dualproxy.filters.transforms import Mapped, Replacements, check_types
from dualproxy.logs import RequestRecord

Pairs = dict[bytes, bytes]


def stream(transform: Replace | BufferedBody | BodyPipeline, chunks: Iterable[bytes]) -> bytes:
    out = [transform.feed(chunk) for chunk in chunks]
    return b"".join(out) + transform.finish()


def reference(body: bytes, table: Pairs) -> bytes:
    """Leftmost, then longest, written the slow obvious way (no regex)."""
    keys = sorted(table, key=len, reverse=True)
    out, i = bytearray(), 0
    while i < len(body):
        key = next((k for k in keys if body.startswith(k, i)), None)
        if key is None:
            out.append(body[i])
            i += 1
        else:
            out += table[key]
            i += len(key)
    return bytes(out)


class RegexTable(Replacements):
    """The regular expression's matching, which tables of more than FIND_KEYS keys use."""

    FIND_KEYS = 0


# -- Replace: chunk boundaries ------------------------------------------------------------

URL = b"http://upstream:8080"
PUBLIC = b"https://public.example"
PAGE = b'<a href="http://upstream:8080/a">a</a> <img src="http://upstream:8080/i.png">'


@pytest.mark.parametrize("split", range(len(PAGE) + 1))
def test_every_split_point_of_a_page_gives_the_whole_body_result(split: int) -> None:
    expected = PAGE.replace(URL, PUBLIC)
    assert stream(Replace({URL: PUBLIC}), [PAGE[:split], PAGE[split:]]) == expected


@pytest.mark.parametrize("first", range(1, 12))
@pytest.mark.parametrize("second", range(1, 12))
def test_every_pair_of_split_points_around_a_match(first: int, second: int) -> None:
    body = b"xx" + URL + b"yy"
    cuts = sorted({first, second + first})
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    assert stream(Replace({URL: PUBLIC}), pieces) == b"xx" + PUBLIC + b"yy"


def test_one_byte_chunks() -> None:
    assert stream(Replace({URL: PUBLIC}), [bytes([b]) for b in PAGE]) == PAGE.replace(URL, PUBLIC)


def test_at_most_longest_minus_one_bytes_are_held() -> None:
    replace = Replace({b"abcd": b"X", b"zz": b"Y"})
    assert replace.feed(b"hello abc") == b"hello "  # "abc" may begin "abcd"
    assert replace.feed(b"d and ab") == b"X and "    # "ab" may begin "abcd"
    assert replace.feed(b"q") == b"abq"
    assert replace.feed(b"xyz") == b"xy"              # "z" may begin "zz"
    assert replace.feed(b"z") == b"Y"
    assert replace.feed(b"") == b""
    assert replace.finish() == b""
    held = Replace({b"abcd": b"X"})
    for chunk, kept in ((b"0123456789", b""), (b"abc", b"abc"), (b"ab", b"ab"), (b"a", b"a"),
                        (b"bcab", b"ab")):
        held.feed(chunk)
        assert held._held == kept


def test_the_end_releases_a_held_partial_match() -> None:
    replace = Replace({URL: PUBLIC})
    assert replace.feed(b"see http://upstream:80") == b"see "
    assert replace.finish() == b"http://upstream:80"


@pytest.mark.parametrize("kind", [Replacements, RegexTable])
def test_leftmost_then_longest(kind: type[Replacements]) -> None:
    table = kind({b"ab": b"1", b"abc": b"2", b"bcd": b"3", b"c": b"4"})
    for pieces in ([b"abcd"], [b"a", b"bcd"], [b"ab", b"cd"], [b"abc", b"d"]):
        assert stream(Replace(table), pieces) == b"2d"   # abc at 0 beats ab and bcd at 1
    assert stream(Replace(table), [b"xbcdc"]) == b"x34"


def test_many_keys_use_the_regular_expression() -> None:
    table = {b"k%02d" % n: b"<%d>" % n for n in range(40)}
    body = b"".join(b"k%02d-" % n for n in range(45))
    assert stream(Replace(table), [body[:7], body[7:100], body[100:]]) == reference(body, table)


def test_replaced_text_is_not_searched_again() -> None:
    assert stream(Replace({b"a": b"aa"}), [b"aaa"]) == b"aaaaaa"
    assert stream(Replace({b"ab": b"a", b"b": b"c"}), [b"abb"]) == b"ac"


def test_str_tables_are_utf8_and_bad_tables_are_refused() -> None:
    assert stream(Replace({"é": "e"}), ["café".encode()[:4], "café".encode()[4:]]) == b"cafe"
    with pytest.raises(ValueError, match="empty"):
        Replacements({b"": b"x"})
    with pytest.raises(ValueError, match="at least one"):
        Replacements({})
    with pytest.raises(TypeError, match="bytes or str"):
        Replacements({b"a": 1})  # type: ignore[dict-item]


chunkings = st.lists(st.integers(min_value=0, max_value=40), max_size=12)


def split_at(body: bytes, cuts: Sequence[int]) -> list[bytes]:
    pieces, pos = [], 0
    for size in cuts:
        pieces.append(body[pos:pos + size])
        pos += size
    return [*pieces, body[pos:]]


@settings(max_examples=400, deadline=None)
@given(body=st.binary(max_size=120), pattern=st.binary(min_size=1, max_size=6),
       replacement=st.binary(max_size=8), cuts=chunkings)
def test_fuzz_one_pattern_is_bytes_replace(body: bytes, pattern: bytes, replacement: bytes,
                                           cuts: list[int]) -> None:
    # Plant the pattern a few times so that matches are common, not luck.
    body = body[:30] + pattern + body[30:60] + pattern + pattern[:-1] + body[60:]
    assert stream(Replace({pattern: replacement}), split_at(body, cuts)) == \
        body.replace(pattern, replacement)


@settings(max_examples=400, deadline=None)
@given(body=st.binary(max_size=100).map(lambda b: bytes(c % 4 + 97 for c in b)),
       table=st.dictionaries(st.text("abcd", min_size=1, max_size=5).map(str.encode),
                             st.binary(max_size=4), min_size=1, max_size=5),
       cuts=chunkings)
def test_fuzz_several_patterns_match_the_whole_body_reference(body: bytes, table: Pairs,
                                                              cuts: list[int]) -> None:
    for replace in (Replace(table), Replace(RegexTable(table))):
        check_stream(replace, body, table, cuts)


def check_stream(replace: Replace, body: bytes, table: Pairs, cuts: list[int]) -> None:
    out = []
    for piece in split_at(body, cuts):
        out.append(replace.feed(piece))
        assert len(replace._held) < max(map(len, table))
    assert b"".join(out) + replace.finish() == reference(body, table)


# -- BufferedBody -------------------------------------------------------------------------


def test_buffered_under_its_limit_edits_the_whole_body() -> None:
    buffered = BufferedBody(lambda whole: whole.upper(), limit=10)
    assert [buffered.feed(c) for c in (b"abc", b"def", b"ghij")] == [b"", b"", b""]
    assert buffered.finish() == b"ABCDEFGHIJ"  # exactly the limit: edited


def test_buffered_over_its_limit_flushes_then_passes_through() -> None:
    edits: list[bytes] = []
    buffered = BufferedBody(lambda whole: edits.append(whole) or whole, limit=5)
    assert buffered.feed(b"abc") == b""
    assert buffered.feed(b"def") == b"abcdef"  # over: what was held, as it came
    assert buffered.passing
    assert buffered.feed(b"ghi") == b"ghi"
    assert buffered.finish() == b""
    assert edits == []


def test_buffered_edit_must_return_bytes() -> None:
    buffered = BufferedBody(lambda whole: whole.decode(), limit=5)  # type: ignore[arg-type,return-value]
    buffered.feed(b"ab")
    with pytest.raises(TypeError, match="returned str"):
        buffered.finish()
    with pytest.raises(ValueError, match=">= 0"):
        BufferedBody(bytes, limit=-1)


def test_a_failing_edit_is_a_transform_failure() -> None:
    pipeline = BodyPipeline()
    pipeline.transforms.append(BufferedBody(lambda whole: json.dumps(json.loads(whole)).encode(),
                                            limit=100))
    pipeline.feed(b"{not json")
    with pytest.raises(TransformFailed, match="body transform failed"):
        pipeline.finish()


# -- the filters at the head --------------------------------------------------------------

CONFIG = ProxyConfig.build("http://127.0.0.1:9")


def exchange_for(method: str = "GET", headers: Sequence[tuple[bytes, bytes]] = (),
                 config: ProxyConfig = CONFIG) -> Exchange:
    incoming = IncomingRequest(method, b"/x", [(b"host", b"front"), *headers], "127.0.0.1")
    exchange = Exchange(incoming, RequestRecord(incoming))
    exchange.plan = plan_request(config, incoming)
    return exchange


def respond(chain: Chain | Sequence[object], status: int = 200,
            headers: Sequence[tuple[bytes, bytes]] = (), body: Sequence[bytes] = (),
            method: str = "GET") -> tuple[ResponseHead, bytes]:
    """The head and body the client gets from `chain` for this upstream response."""
    chain = chain if isinstance(chain, Chain) else Chain(chain)  # type: ignore[arg-type]
    exchange = exchange_for(method)
    head = run_sync(chain.response(exchange, ResponseHead(status, list(headers), True)))
    pipeline = exchange._response_pipeline
    return head, body_through(pipeline, body)


def body_through(pipeline: BodyPipeline | None, body: Sequence[bytes]) -> bytes:
    return b"".join(body) if pipeline is None else stream(pipeline, body)


HTML = [(b"Content-Type", b"text/html; charset=utf-8")]


def test_sub_filter_rewrites_its_types_only() -> None:
    sub = SubFilter({"http://upstream:8080": "https://public.example"})
    head, body = respond([sub], headers=[*HTML, (b"Content-Length", b"25"), (b"ETag", b'"v1"')],
                         body=[b"go http://upstr", b"eam:8080/x"])
    assert body == b"go https://public.example/x"
    assert (b"ETag", b'W/"v1"') in head.headers
    assert not [n for n, _ in head.headers if n.lower() == b"content-length"]
    for ctype in (b"application/json", b"image/png", b"text/plain"):
        head, body = respond([sub], headers=[(b"Content-Type", ctype)],
                             body=[b"http://upstream:8080"])
        assert body == b"http://upstream:8080"
    _, body = respond([SubFilter({"a": "b"}, types=["text/*"])],
                      headers=[(b"Content-Type", b"TEXT/CSS")], body=[b"a"])
    assert body == b"b"


@pytest.mark.parametrize(("status", "method"), [(206, "GET"), (304, "GET"), (204, "GET"),
                                                (200, "HEAD")])
def test_no_transform_on_parts_and_bodiless_answers(status: int, method: str) -> None:
    head, body = respond([SubFilter({"a": "b"})], status=status, method=method,
                         headers=[*HTML, (b"Content-Length", b"1")], body=[b"a"])
    assert body == b"a" and (b"Content-Length", b"1") in head.headers


def encoded(coding: str, data: bytes) -> bytes:
    if coding == "gzip":
        return gzip.compress(data)
    if coding == "deflate":
        return zlib.compress(data)
    if coding == "br":
        return bytes(brotli.compress(data))
    return zstandard.ZstdCompressor().compress(data)


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd"])
def test_decode_then_transform(coding: str) -> None:
    data = encoded(coding, b"<p>http://upstream:8080/</p>" * 50)
    head, body = respond([SubFilter({"http://upstream:8080": "/"})],
                         headers=[*HTML, (b"Content-Encoding", coding.encode())],
                         body=[data[:7], data[7:20], data[20:]])
    assert body == b"<p>//</p>" * 50
    assert not [n for n, _ in head.headers if n.lower() == b"content-encoding"]


def test_without_decode_an_encoded_body_is_left_as_it_came() -> None:
    data = gzip.compress(b"http://upstream:8080")
    headers = [*HTML, (b"Content-Encoding", b"gzip"), (b"Content-Length", b"%d" % len(data))]
    head, body = respond([SubFilter({"http://upstream:8080": "/"}, decode=False)],
                         headers=headers, body=[data])
    assert body == data and head.headers == headers


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd"])
def test_a_body_that_does_not_decode_raises_transform_failed(coding: str) -> None:
    data = encoded(coding, b"hello world " * 20)
    upper = body_filter(bytes.upper, types="text/html", decode=True)
    headers = [*HTML, (b"Content-Encoding", coding.encode())]
    with pytest.raises(TransformFailed):  # cut short: no end mark
        respond([upper], headers=headers, body=[data[:len(data) // 2]])
    with pytest.raises(TransformFailed):  # garbage
        respond([upper], headers=headers, body=[b"\xff" * 16 + data])


def test_buffered_decides_at_the_head_when_the_length_is_known() -> None:
    edit = Buffered(lambda whole: b"edited", limit=10, types="application/json")
    big = [(b"Content-Type", b"application/json"), (b"Content-Length", b"11"),
           (b"ETag", b'"e"')]
    head, body = respond([edit], headers=big, body=[b"{" + b" " * 9 + b"}"])
    assert head.headers == big and body == b"{         }"  # untouched, framing and ETag too
    small = [(b"Content-Type", b"application/json"), (b"Content-Length", b"10")]
    head, body = respond([edit], headers=small, body=[b"{", b"        }"])
    assert body == b"edited" and head.headers == [(b"Content-Type", b"application/json")]


def test_buffered_without_a_length_flushes_past_the_limit() -> None:
    edit = Buffered(lambda whole: b"edited", limit=4)
    chunked = [(b"Transfer-Encoding", b"chunked")]
    assert respond([edit], headers=chunked, body=[b"ab", b"cd"])[1] == b"edited"
    assert respond([edit], headers=chunked, body=[b"ab", b"cd", b"e", b"f"])[1] == b"abcdef"


def test_json_edit() -> None:
    def add_field(whole: bytes) -> bytes:
        return json.dumps({**json.loads(whole), "via": "proxy"}).encode()

    _, body = respond([Buffered(add_field, types="application/json")],
                      headers=[(b"Content-Type", b"application/json")],
                      body=[b'{"a"', b": 1}"])
    assert json.loads(body) == {"a": 1, "via": "proxy"}


class Counter:
    """A transform with per-exchange state: numbers the lines of a body."""

    def __init__(self) -> None:
        self.line = 0
        self.partial = b""

    def feed(self, chunk: bytes) -> bytes:
        *lines, self.partial = (self.partial + chunk).split(b"\n")
        out = []
        for line in lines:
            self.line += 1
            out.append(b"%d: %s\n" % (self.line, line))
        return b"".join(out)

    def finish(self) -> bytes:
        return self.feed(b"\n") if self.partial else b""


def test_a_class_transform_gets_fresh_state_per_exchange() -> None:
    from dualproxy.filters import ResponseBodyFilter

    numbered = ResponseBodyFilter(Counter, types="text/plain")
    plain = [(b"Content-Type", b"text/plain")]
    for _ in range(2):
        assert respond([numbered], headers=plain, body=[b"a\nb", b"\nc"])[1] == \
            b"1: a\n2: b\n3: c\n"


def test_transforms_stack_innermost_first() -> None:
    outer = body_filter(lambda c: c.replace(b"B", b"C"))
    inner = body_filter(lambda c: c.replace(b"A", b"B"))
    assert respond([outer, inner], body=[b"A"])[1] == b"C"
    assert respond([inner, outer], body=[b"A"])[1] == b"B"


def test_types_are_checked() -> None:
    for bad in ("html", "text/", "*/html", "a/b/c"):
        with pytest.raises(ValueError, match="type/subtype"):
            check_types(bad)
    assert check_types(["Text/HTML ", "*/*"]) == ("text/html", "*/*")
    untyped = body_filter(bytes.upper, types="*/*")
    assert respond([untyped], body=[b"a"])[1] == b"A"
    assert respond([body_filter(bytes.upper, types="text/*")], body=[b"a"])[1] == b"a"


# -- request bodies -----------------------------------------------------------------------


def test_a_request_transform_chunks_the_upstream_request() -> None:
    flt = request_body_filter(bytes.upper, types="text/plain")
    exchange = exchange_for("POST", [(b"content-type", b"text/plain"),
                                     (b"content-length", b"3")])
    assert run_sync(Chain([flt]).request(exchange)) is None
    assert exchange.plan is not None
    assert (b"transfer-encoding", b"chunked") in exchange.plan.headers
    assert b"content-length" not in dict(exchange.plan.headers)
    assert body_through(exchange._request_pipeline, [b"a", b"bc"]) == b"ABC"


def test_a_request_transform_leaves_other_types_and_bodiless_requests() -> None:
    flt = RequestBodyFilter(lambda: Mapped(bytes.upper), types="text/plain")
    for method, headers in (("POST", [(b"content-type", b"application/json"),
                                      (b"content-length", b"3")]), ("GET", [])):
        exchange = exchange_for(method, headers)
        run_sync(Chain([flt]).request(exchange))
        assert exchange._request_pipeline is None


# -- configuration ------------------------------------------------------------------------


def test_sub_filter_option_builds_the_filter_in_the_chain() -> None:
    config = ProxyConfig.build("http://127.0.0.1:9", sub_filter={"a=b": "c"},
                               sub_filter_types=["text/css"])
    chain = build_chain(config)
    assert [type(f) for f in chain.filters] == [SubFilter]
    _, body = respond(chain, headers=[(b"Content-Type", b"text/css")], body=[b"xa=", b"by"])
    assert body == b"xcy"
    assert not build_chain(CONFIG).filters


@pytest.mark.parametrize(("options", "message"), [
    ({"sub_filter": {"": "x"}}, "sub_filter: a replacement's pattern must not be empty"),
    ({"sub_filter": {"a": "b"}, "sub_filter_types": ["html"]}, "sub_filter: a media type"),
    ({"sub_filter_types": ["text/css"]}, "sub_filter_types needs sub_filter"),
])
def test_bad_sub_filter_options_fail_at_construction(options: dict[str, object],
                                                     message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ProxyConfig.build("http://127.0.0.1:9", **options)  # type: ignore[arg-type]


# -- the config file's sub_filter ---------------------------------------------------------

ROUTE = '[[route]]\nmount = "/a"\nupstream = "http://127.0.0.1:9"\n'


def load_route(tmp_path: Path, text: str) -> dict[str, object]:
    path = tmp_path / "routes.toml"
    path.write_text(ROUTE + text)
    _, routes = load_config_file(str(path), ["serve", "--config", str(path)])
    json.dumps(routes)  # what the worker processes rebuild the routes from
    return routes[0]


def test_config_file_sub_filter_forms(tmp_path: Path) -> None:
    table = load_route(tmp_path, 'sub_filter = { "http://a:1/?x=1" = "https://b", "c" = "" }\n')
    config = check_route(table)
    assert config.sub_filter == ((b"http://a:1/?x=1", b"https://b"), (b"c", b""))
    listed = load_route(tmp_path, 'sub_filter = ["a=b=c", "d="]\nsub_filter_types = ["text/*"]\n')
    config = check_route(listed)
    assert config.sub_filter == ((b"a", b"b=c"), (b"d", b""))
    assert config.sub_filter_types == ("text/*",)
    sub_table = load_route(tmp_path, '[route.sub_filter]\n"x" = "y"\n')
    assert check_route(sub_table).sub_filter == ((b"x", b"y"),)


@pytest.mark.parametrize(("text", "message"), [
    ('sub_filter = { "" = "x" }\n', ":4: bad value for 'sub_filter' in [[route]] #1 (mount '/a'): "
                                    "an empty pattern"),
    ('sub_filter = { "a" = 1 }\n', ":4: 'sub_filter' in [[route]] #1 (mount '/a') must be a "
                                   "string, got an integer (1)"),
    ('sub_filter = ["nope"]\n', ":4: bad value for 'sub_filter' in [[route]] #1 (mount '/a'): "
                                "expected FROM=TO with a non-empty FROM, got 'nope'"),
    ('sub_filter = ["a=b"]\nsub_filter_types = ["html"]\n',
     ":5: bad value for 'sub_filter_types' in [[route]] #1 (mount '/a'): a media type is "
     "'type/subtype' or 'type/*', got 'html'"),
    ('sub_filter_types = ["text/css"]\n', ":4: [[route]] #1 (mount '/a'): sub_filter_types needs "
                                          "sub_filter"),
])
def test_bad_config_file_sub_filter(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_route(tmp_path, text)
    assert message in str(info.value)


def test_a_chunk_function_returning_text_fails_the_exchange() -> None:
    pipeline = BodyPipeline()
    pipeline.transforms.append(Mapped(lambda chunk: chunk.decode()))  # type: ignore[arg-type,return-value]
    with pytest.raises(TransformFailed, match="returned str, expected bytes"):
        pipeline.feed(b"abc")
    with pytest.raises(TypeError, match="returned int"):
        Mapped(len).feed(b"abc")  # type: ignore[arg-type]
    assert Mapped(bytearray).feed(b"x") == b"x"
