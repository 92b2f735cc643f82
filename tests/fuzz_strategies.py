"""Hypothesis strategies for HTTP/1.1 response streams, valid and not.

An `Exchange` is a request method plus the bytes an upstream answers with:
zero or more interim 1xx responses, a final response (status line, header
fields, a body framed by Content-Length, chunked coding or EOF), maybe bytes
past the body, all split at random points, then maybe EOF. Most draws are
well formed, so both references accept them and the comparison has teeth;
the rest bend one thing at a time (spellings, separators, line ends, control
bytes, chunk sizes, lists with empty items) where parsers tend to disagree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hypothesis import strategies as st

CRLF = b"\r\n"


@dataclass(frozen=True)
class Exchange:
    method: bytes
    stream: bytes
    cuts: tuple[int, ...]  # where the stream is split into the pieces fed one by one
    eof: bool

    @property
    def pieces(self) -> list[bytes]:
        bounds = [0, *sorted(c for c in self.cuts if 0 < c < len(self.stream)), len(self.stream)]
        return [self.stream[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def _one_in(n: int) -> st.SearchStrategy[bool]:
    """True about once in `n` draws (st.integers would favour its bounds), False when shrunk."""
    return st.sampled_from([False] * (n - 1) + [True])


def _rarely(usual: st.SearchStrategy[bytes], odd: st.SearchStrategy[bytes],
            one_in: int) -> st.SearchStrategy[bytes]:
    """`odd` about once in `one_in` draws, else `usual`."""
    return _one_in(one_in).flatmap(lambda rare: odd if rare else usual)


def _mostly(usual: bytes, *odd: bytes, one_in: int = 12) -> st.SearchStrategy[bytes]:
    return _rarely(st.just(usual), st.sampled_from(odd), one_in)


line_end = _mostly(CRLF, b"\n", b"\r", b"\r\r\n", b"\n\r", one_in=24)
versions = _rarely(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]),
                   st.sampled_from([b"HTTP/1.2", b"HTTP/2.0", b"http/1.1", b"HTTP/1.01",
                                    b"HTTP/11", b"HTTP /1.1", b"HTTP/1.1 "]), 16)
statuses = st.one_of(
    st.sampled_from([200, 200, 201, 204, 206, 301, 304, 404, 500, 101, 199, 299, 999]),
    st.integers(100, 599),
)
status_codes = _rarely(
    statuses.map(lambda s: b"%03d" % s),
    st.sampled_from([b"20", b"2000", b"+20", b"-20", b" 200", b"2 0", b"0x1", b"\xd9\xa2"]), 16)
reason_bytes = st.sampled_from([b"O", b"K", b" ", b"\t", b"\x80", b"\xff", b"\x7f",
                                b"\x00", b"\x01", b"\r", b"\n", b":", b"("])
reasons = _rarely(
    st.sampled_from([b" OK", b" Not Found", b"", b" ", b" Continue", b" \xe9t\xe9"]),
    st.lists(reason_bytes, max_size=6).map(lambda parts: b" " + b"".join(parts)), 8)

# Header names: the framing ones in every case spelling, ordinary ones, broken ones.
length_names = st.sampled_from([b"Content-Length", b"content-length", b"CONTENT-LENGTH"])
coding_names = st.sampled_from([b"Transfer-Encoding", b"transfer-encoding", b"TRANSFER-ENCODING"])
framing_names = st.one_of(length_names, coding_names)
plain_names = st.sampled_from([b"Server", b"X-A", b"set-cookie", b"Trailer", b"Keep-Alive",
                               b"Upgrade", b"Date", b"Connection", b"connection"])
bad_names = st.sampled_from([b"", b"X A", b"X\x00A", b"X\tA", b"(x)", b"X\"", b"\xe9t\xe9",
                             b" Server", b"Server ", b"X\x7f", b"X@", b"X/Y", b"Content-Length "])
value_bytes = st.sampled_from([b"a", b"Z", b"0", b" ", b"\t", b",", b";", b"=", b"\"",
                               b"\x80", b"\xff", b"\x7f", b"\x00", b"\x0b", b"\x1f", b"\r",
                               b"\n"])
plain_values = _rarely(
    st.sampled_from([b"x", b"gunicorn", b"a b", b"", b"a=b; Path=/", b"\xc3\xa9t\xc3\xa9",
                     b"close", b"keep-alive", b"Keep-Alive", b"close, keep-alive", b"upgrade",
                     b"foo, close", b"closed"]),
    st.lists(value_bytes, max_size=6).map(b"".join), 8)
length_values = _rarely(
    st.integers(0, 40).map(lambda n: b"%d" % n),
    st.sampled_from([b"+5", b"-5", b"05", b"00", b"5, 5", b"5,5", b"5,6", b"5,", b",5", b"",
                     b" 5 ", b"5 5", b"0x5", b"5.0", b"99999999999999999999",
                     b"18446744073709551616", b"1" * 19, b"\xd9\xa5"]), 3)
codings = st.sampled_from([b"chunked", b"chunked", b"Chunked", b"CHUNKED", b"gzip",
                           b"identity", b"", b" ", b"foo", b"chunked;q=1", b"\"chunked\""])
coding_values = st.lists(codings, min_size=1, max_size=3).flatmap(
    lambda items: st.sampled_from([b", ", b",", b" ,", b" , "]).map(lambda sep: sep.join(items)))
# Transfer-Encoding values that end in chunked, or nearly (empty items, repeats).
chunked_values = _mostly(b"chunked", b"Chunked", b"chunked,", b",chunked", b"chunked, ",
                         b", chunked", b"chunked,,", b"gzip, chunked", b"chunked, chunked",
                         b"identity, chunked", b"chunked, identity", b" chunked", one_in=5)
separators = _mostly(b": ", b":", b":\t", b":  ", b" : ", b"\t:", b": \x00", b":\x0b")


@st.composite
def header_field(draw: st.DrawFn) -> bytes:
    """One header line without its line end, maybe followed by an obs-fold line."""
    kind = draw(st.sampled_from(["plain"] * 17 + ["framing"] * 2 + ["bad"]))
    if kind == "bad":
        name, value = draw(bad_names), draw(plain_values)
    elif kind == "framing":  # a second framing header: mostly conflicts with the body's own
        name = draw(framing_names)
        value = draw(length_values if name.lower() == b"content-length" else coding_values)
    else:
        name, value = draw(plain_names), draw(plain_values)
    trailing = draw(_mostly(b"", b" ", b"\t", b" \t", one_in=4))
    line = name + draw(separators) + value + trailing
    if draw(_one_in(40)):
        line += draw(line_end) + draw(st.sampled_from([b" ", b"\t"])) + draw(plain_values)
    return line


@st.composite
def head(draw: st.DrawFn, status: bytes, fields: list[bytes]) -> bytes:
    end = draw(_mostly(CRLF, b"\n", b"\r\r\n"))
    lines = [draw(versions) + b" " + status + draw(reasons), *fields]
    if draw(_one_in(20)):  # every line with its own ending
        return b"".join(line + draw(line_end) for line in lines) + draw(line_end)
    return b"".join(line + end for line in lines) + end


@st.composite
def chunked_body(draw: st.DrawFn, body: bytes) -> bytes:
    """`body` in chunked coding, sometimes subtly (or grossly) wrong."""
    cuts = sorted(draw(st.lists(st.integers(1, max(len(body) - 1, 1)), max_size=3)))
    parts = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True) if b > a]
    out = []
    for part in [*parts, b""]:
        size = len(part)
        if draw(_one_in(30)):
            size = draw(st.integers(0, 20))  # a size that lies
        digits = draw(st.sampled_from(["%x", "%X", "%04x", "%x", "%017x"])) % size
        if draw(_one_in(40)):
            digits = draw(st.sampled_from(["1" * 17, "ffffffffffffffff1", "1 ", " 1", "+1",
                                           "0x1", "1_0", "g", ""]))
        ext = draw(_mostly(b"", b";a=b", b"; a=b", b";a", b";a=\"x;y\"", b" ;a", b";\x00",
                           b";a=\x01", b";a=b\r", one_in=6))
        out.append(digits.encode() + ext + draw(line_end))
        if size:
            out.append(part + draw(line_end))
    trailers = draw(st.lists(header_field(), max_size=2))
    out += [t + draw(line_end) for t in trailers]
    out.append(draw(line_end))
    return b"".join(out)


@st.composite
def response(draw: st.DrawFn, *, final: bool) -> bytes:
    """One response; its framing headers follow the body mostly, not always."""
    if final:
        status = draw(status_codes)
    else:
        status = b"%d" % draw(st.sampled_from([100, 102, 103, 150, 199]))
    # Rarely a body past MAX_PIECE (256 KiB), which dualproxy hands out in pieces.
    big = st.integers(200_000, 600_000).map(lambda n: bytes(range(256)) * (n // 256))
    body = draw(_rarely(st.binary(max_size=24), big, 50)) if final else b""
    framing = draw(st.sampled_from(["length", "length", "chunked", "chunked", "close",
                                    "none"])) if final else "none"
    fields = draw(st.lists(header_field(), max_size=4))
    spot = draw(st.integers(0, len(fields)))
    if framing == "length":
        length = b"%d" % len(body)
        fields.insert(spot, draw(length_names)
                      + b": " + length)
        if draw(_one_in(8)):  # the same length again, maybe spelled otherwise
            again = draw(st.sampled_from([length, b"0" + length, length + b", " + length,
                                          length + b",0" + length, b"+" + length]))
            fields.insert(draw(st.integers(0, len(fields))), b"Content-Length: " + again)
        payload = body
    elif framing == "chunked":
        name = draw(coding_names)
        fields.insert(spot, name + b": " + draw(chunked_values))
        payload = draw(chunked_body(body))
    else:
        payload = body if framing == "close" else b""
    return draw(head(status, fields)) + payload


@st.composite
def exchanges(draw: st.DrawFn) -> Exchange:
    method = draw(_mostly(b"GET", b"HEAD"))
    interim = draw(st.lists(response(final=False), max_size=2))
    stream = b"".join(interim) + draw(response(final=True))
    stream += draw(_mostly(b"", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", b"junk",
                           b"\r\n", b"0\r\n\r\n"))
    if draw(_one_in(10)):  # EOF somewhere inside
        stream = stream[:draw(st.integers(0, len(stream)))]
    if draw(_one_in(10)):  # a byte at a time
        cuts = tuple(range(1, len(stream)))
    else:
        cuts = tuple(draw(st.lists(st.integers(0, len(stream)), max_size=4)))
    return Exchange(method, stream, cuts, draw(st.booleans()))


# ------------------------------------------------------------------- mutation of a corpus
#
# The method of the independent fuzz that found issue 16's framing bugs: valid
# responses, each bent by a few byte-level edits biased to the bytes HTTP/1.1
# framing turns on, with header lines duplicated or reordered, a pipelined tail
# or a truncation, then fed in random read sizes.

_CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
CORPUS = (
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello",
    _CHUNKED + b"\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n",
    _CHUNKED + b"Trailer: X-T\r\n\r\n3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nServer: x\r\n\r\nread to the close",
    b"HTTP/1.1 204 No Content\r\nServer: x\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\nETag: \"a\"\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 3\r\n\r\nabc",
    b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nabc\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx",
    b"HTTP/1.1 404 Not Found\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello",
)
TAILS = (b"", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbad", b"0\r\n\r\n", b"\r\n",
         b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n")
# What the edits insert or swap in: framing's own bytes, mostly, and some of anything.
FRAMING_BYTES = b"\r\n \t:;,0123456789abcdefABCDEF\x00\x7f\x80\xff\x0b\x0c"
edit_bytes = st.one_of(st.sampled_from([b" ", b"\t", b"\r", b"\n"]),  # whitespace first
                       st.sampled_from(list(FRAMING_BYTES)).map(lambda b: bytes([b])),
                       st.binary(min_size=1, max_size=1))


def _lines(message: bytes) -> tuple[list[bytes], bytes]:
    """(header lines with their CRLF, the rest from the blank line on) of a message's head."""
    head, sep, rest = message.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    return [line + b"\r\n" for line in lines], b"\r\n" + rest if sep else b""


@st.composite
def mutated_exchanges(draw: st.DrawFn) -> Exchange:
    stream = draw(st.sampled_from(CORPUS))
    lines, rest = _lines(stream)
    if len(lines) > 2 and draw(_one_in(4)):  # a header line twice
        lines.insert(draw(st.integers(1, len(lines))),
                     lines[draw(st.integers(1, len(lines) - 1))])
    if len(lines) > 2 and draw(_one_in(4)):  # header lines reordered
        fields = lines[1:]
        lines = [lines[0], *draw(st.permutations(fields))]
    stream = b"".join(lines) + rest + draw(st.sampled_from(TAILS))
    data = bytearray(stream)
    for _ in range(draw(st.integers(0, 3))):
        # Mostly anywhere; often where values start or end (after ": ", before a CR),
        # where parsers trim whitespace and split lists differently.
        edges = [m.end() for m in re.finditer(rb": ", data)] + [
            m.start() for m in re.finditer(rb"\r", data)]
        where = draw(st.sampled_from(edges) if edges and draw(st.booleans())
                     else st.integers(0, len(data)))
        edit = draw(st.sampled_from(["insert", "insert", "delete", "swap"]))
        if edit == "insert":
            data[where:where] = draw(edit_bytes)
        elif where < len(data):
            data[where:where + 1] = b"" if edit == "delete" else draw(edit_bytes)
    stream = bytes(data)
    if draw(_one_in(8)):  # truncated (then mostly EOF)
        stream = stream[:draw(st.integers(0, len(stream)))]
    if draw(_one_in(10)):
        cuts = tuple(range(1, len(stream)))
    else:
        cuts = tuple(draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    return Exchange(draw(_mostly(b"GET", b"HEAD", one_in=10)), stream, cuts,
                    draw(st.booleans()))
