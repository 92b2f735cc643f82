"""The recording upstream checked on its own, with no proxy in between.

Every proxy test trusts `Record`; these prove it records exactly what was on the wire (raw
target, header order and case, framing, body hash, aborts) and that the actions the proxy
tests lean on (download, gate, 100-continue, reset, cut) behave as documented.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid

import httpx
import pytest

from tests.rawhttp import Reader, connect, exchange, read_head, read_response, request_bytes
from tests.upstream import Upstream, gzip_pattern, pattern_bytes, pattern_sha256


def new_id() -> str:
    return uuid.uuid4().hex


def test_raw_target_and_header_order_case_duplicates(upstream: Upstream) -> None:
    """Targets are bytes as sent (no %2F decoding); headers keep order, case, duplicates."""
    rid = new_id()
    raw = (b"GET /a%2Fb?x&y= HTTP/1.1\r\nHost: up.test\r\nX-Dup: one\r\nx-req-id: "
           + rid.encode() + b"\r\nx-dup:  two \r\nCoOkIe: a=1\r\n\r\n")
    resp = exchange(upstream.port, raw)
    assert resp.status == 200 and resp.header("x-req-id") == rid
    rec = upstream.wait_record(rid, complete=True)
    assert rec.target == b"/a%2Fb?x&y=" and rec.method == "GET"
    assert rec.headers == [(b"Host", b"up.test"), (b"X-Dup", b"one"), (b"x-req-id", rid.encode()),
                           (b"x-dup", b"two"), (b"CoOkIe", b"a=1")]
    assert rec.header_all("X-DUP") == ["one", "two"] and rec.header("cookie") == "a=1"
    assert rec.header_names() == ["host", "x-dup", "x-req-id", "x-dup", "cookie"]
    assert (rec.framing, rec.body_length, rec.complete, rec.aborted) == ("none", 0, True, False)
    assert json.loads(resp.body)["target"] == "/a%2Fb?x&y="


def test_chunked_body_decoded_and_hashed(upstream: Upstream) -> None:
    """Chunk framing, extensions and trailers are stripped; the decoded body is hashed."""
    rid = new_id()
    body = b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: t\r\n\r\n"
    resp = exchange(upstream.port, request_bytes(
        "POST", "/c", [("x-req-id", rid), ("Transfer-Encoding", "chunked")], body))
    rec = upstream.wait_record(rid, complete=True)
    assert resp.status == 200 and rec.complete and not rec.aborted
    assert (rec.framing, rec.body, rec.body_length) == ("chunked", b"hello world", 11)
    assert rec.body_sha256 == hashlib.sha256(b"hello world").hexdigest()
    assert rec.t_first_body is not None and rec.t_end is not None


def test_content_length_body_via_httpx(upstream: Upstream) -> None:
    """A Content-Length upload is recorded whole and the echo JSON agrees with the record."""
    rid = new_id()
    data = pattern_bytes(300_000)
    with httpx.Client(base_url=upstream.url) as client:
        echoed = client.post("/upload", content=data, headers={"x-req-id": rid}).json()
    rec = upstream.wait_record(rid, complete=True)
    assert (rec.framing, rec.content_length, rec.body_length) == ("content-length", 300_000,
                                                                  300_000)
    assert rec.body == data and rec.body_sha256 == pattern_sha256(300_000)
    assert echoed["body_sha256"] == rec.body_sha256 and echoed["conn_id"] == rec.conn_id


def test_cut_upload_is_aborted(upstream: Upstream) -> None:
    """A client that dies mid-body leaves complete=False, aborted=True and what did arrive."""
    rid = new_id()
    with connect(upstream.port) as sock:
        sock.sendall(request_bytes("POST", "/cut", [("x-req-id", rid),
                                                    ("Content-Length", "1000")]) + b"x" * 10)
        upstream.wait_record(rid)
    rec = upstream.wait_record(rid, complete=False)
    assert (rec.complete, rec.aborted, rec.body_length) == (False, True, 10)


def test_both_framings_recorded_and_bad_length_refused(upstream: Upstream) -> None:
    """TE+CL is recorded as "both" and read as chunked; a malformed CL is refused with 400."""
    rid = new_id()
    resp = exchange(upstream.port, request_bytes(
        "POST", "/b", [("x-req-id", rid), ("Content-Length", "3"),
                       ("Transfer-Encoding", "chunked")], b"2\r\nok\r\n0\r\n\r\n"))
    rec = upstream.wait_record(rid, complete=True)
    assert resp.status == 200 and (rec.framing, rec.content_length, rec.body) == ("both", 3, b"ok")
    bad = new_id()
    resp = exchange(upstream.port, request_bytes(
        "POST", "/b", [("x-req-id", bad), ("Content-Length", "+3")], b"abc"))
    rec = upstream.wait_record(bad, complete=True)
    assert resp.status == 400 and rec.error is not None and not rec.complete


def test_keep_alive_and_pipelining_share_conn_id(upstream: Upstream) -> None:
    """Requests on one connection (sequential or pipelined) get one conn_id, in order."""
    ids = [new_id() for _ in range(3)]
    with httpx.Client(base_url=upstream.url) as client:
        client.get("/1", headers={"x-req-id": ids[0]})
        client.get("/2", headers={"x-req-id": ids[1]})
    with connect(upstream.port) as sock:
        sock.sendall(b"".join(request_bytes("GET", f"/p{i}", [("x-req-id", f"{ids[2]}-{i}")])
                              for i in range(2)))
        reader = Reader(sock)
        echoed = [json.loads(read_response(reader).body)["target"] for _ in range(2)]
    first, second = (upstream.wait_record(i) for i in ids[:2])
    p0, p1 = (upstream.wait_record(f"{ids[2]}-{i}") for i in range(2))
    assert first.conn_id == second.conn_id and p0.conn_id == p1.conn_id != first.conn_id
    assert echoed == ["/p0", "/p1"]


@pytest.mark.parametrize("action", ["download size=1000003",
                                    "download size=1000003 chunked=1 chunk=70000",
                                    "download size=100000 gzip=1"])
def test_download_matches_pattern(upstream: Upstream, action: str) -> None:
    """Downloads are the documented pattern, whatever the framing."""
    size = int(action.split()[1].removeprefix("size="))
    with httpx.Client(base_url=upstream.url) as client:
        resp = client.get("/d", headers={"x-upstream": action})
    assert resp.status_code == 200
    if "gzip" in action:
        assert resp.headers["content-encoding"] == "gzip"
        assert resp.headers["content-length"] == str(len(gzip_pattern(size)))
    assert hashlib.sha256(resp.content).hexdigest() == pattern_sha256(size)
    assert resp.content == pattern_bytes(size)


def test_gate_holds_the_rest_of_a_download(upstream: Upstream) -> None:
    """With gate=NAME only the first chunk flows until the test sets the gate."""
    name, size = new_id(), 200_000
    with connect(upstream.port, timeout=5) as sock:
        sock.sendall(request_bytes("GET", "/g", [
            ("x-upstream", f"download size={size} chunk=1000 gate={name}")]))
        reader = Reader(sock)
        status, _, _, _ = read_head(reader)
        first, ok = reader.exactly(1000)
        assert status == 200 and ok and first == pattern_bytes(1000)
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            reader.exactly(1)  # nothing more until the gate opens
        sock.settimeout(5)
        upstream.gate(name).set()
        rest, ok = reader.exactly(size - 1000)
        assert ok and first + rest == pattern_bytes(size)


def test_expect_100_continue(upstream: Upstream) -> None:
    """The upstream answers 100 Continue before it reads the body, then the final status."""
    rid = new_id()
    with connect(upstream.port, timeout=5) as sock:
        sock.sendall(request_bytes("PUT", "/e", [("x-req-id", rid), ("Expect", "100-continue"),
                                                 ("Content-Length", "4")]))
        reader = Reader(sock)
        assert reader.line() == b"HTTP/1.1 100 Continue" and reader.line() == b""
        sock.sendall(b"data")
        resp = read_response(reader)
    assert resp.status == 200 and upstream.wait_record(rid, complete=True).body == b"data"


def test_failure_actions(upstream: Upstream) -> None:
    """reset sends RST with no response; cut ends a response short; raw writes exact bytes;
    headers keeps duplicate response headers; an unknown action is a 400."""
    with pytest.raises((ConnectionError, OSError)):
        exchange(upstream.port, request_bytes("GET", "/r", [("x-upstream", "reset")]), timeout=5)
    cut = exchange(upstream.port, request_bytes("GET", "/c", [("x-upstream",
                                                               "cut size=1000 after=100")]))
    assert (cut.complete, len(cut.body)) == (False, 100)
    raw = base64.b64encode(b"HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\nhi").decode()
    resp = exchange(upstream.port, request_bytes("GET", "/w", [("x-upstream", "raw close=1"),
                                                               ("x-upstream-raw", raw)]))
    assert (resp.status, resp.body) == (202, b"hi")
    pairs = [["Set-Cookie", "a=1"], ["Location", "http://up/x"], ["Set-Cookie", "b=2"]]
    resp = exchange(upstream.port, request_bytes("GET", "/h", [
        ("x-upstream", "headers status=302"), ("x-upstream-headers", json.dumps(pairs))]))
    assert resp.status == 302 and resp.headers[:3] == [tuple(p) for p in pairs]
    resp = exchange(upstream.port, request_bytes("GET", "/u", [("x-upstream", "nope")]))
    assert resp.status == 400


def test_wait_record_times_out(upstream: Upstream) -> None:
    """A request that never arrives raises TimeoutError instead of hanging the suite."""
    with pytest.raises(TimeoutError):
        upstream.wait_record(new_id(), timeout=0.05)
