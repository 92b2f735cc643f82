"""The WSGI tunnel's frame scanner and close frames, fuzzed against the `websockets` library.

`dualproxy.websocket.framing` is hand-written protocol code (the tunnel never decodes a
payload, it only follows frame headers), so it is checked against a reference: frames
serialized by `websockets.frames.Frame` and split into arbitrary reads must be followed
exactly, a size limit must be hit at exactly the frame that `websockets` would count past it,
and the close frames the tunnel writes must parse back with `websockets` as the close they say.
"""

from __future__ import annotations

from collections.abc import Iterator

from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.frames import Close, Frame, Opcode
from websockets.streams import StreamReader

from dualproxy.websocket.framing import FrameScanner, close_frame

DATA = (Opcode.TEXT, Opcode.BINARY)
CONTROL = (Opcode.PING, Opcode.PONG)


@st.composite
def messages(draw: st.DrawFn) -> list[Frame]:
    """A valid frame sequence: data messages in fragments, control frames between them."""
    frames: list[Frame] = []
    for _ in range(draw(st.integers(1, 4))):
        pieces = draw(st.lists(st.integers(0, 70_000), min_size=1, max_size=3))
        for n, size in enumerate(pieces):
            opcode = draw(st.sampled_from(DATA)) if n == 0 else Opcode.CONT
            frames.append(Frame(opcode, b"\x00" * size, fin=n == len(pieces) - 1))
            if draw(st.booleans()):
                frames.append(Frame(draw(st.sampled_from(CONTROL)), draw(st.binary(max_size=125))))
    return frames


def split(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    """`data` as the reads a socket might give: cut at the (sorted, deduplicated) offsets."""
    last = 0
    for cut in sorted({c % (len(data) + 1) for c in cuts}):
        yield data[last:cut]
        last = cut
    yield data[last:]


def first_over(frames: list[Frame], sizes: list[int], limit: int) -> int | None:
    """Where the reference says the scanner must stop: the offset of the first data frame
    that makes its message longer than `limit` (counted from the serialized sizes)."""
    offset = message = 0
    for frame, size in zip(frames, sizes, strict=True):
        if frame.opcode in (*DATA, Opcode.CONT):
            message += len(frame.data)
            if message > limit:
                return offset
            if frame.fin:
                message = 0
        offset += size
    return None


@settings(max_examples=300, deadline=None, derandomize=True)
@given(messages(), st.booleans(), st.lists(st.integers(0, 1 << 20), max_size=6),
       st.integers(0, 150_000) | st.none())
def test_the_scanner_follows_what_websockets_serializes(
        frames: list[Frame], mask: bool, cuts: list[int], limit: int | None) -> None:
    wire = [f.serialize(mask=mask) for f in frames]
    stream = b"".join(wire)
    expected = None if limit is None else first_over(frames, [len(w) for w in wire], limit)
    scanner = FrameScanner(limit)
    seen = 0
    found = None
    for read in split(stream, cuts):
        hit = scanner.scan(read)
        if hit is not None:
            found = seen + hit
            break
        seen += len(read)
    if expected is None:
        assert found is None
        assert scanner.at_boundary and scanner.message == 0
    elif scanner.clean_cut:
        assert found == expected  # the refused frame starts here: nothing of it relayed
    else:
        # Its header began in an earlier, already relayed read: the scanner refuses the
        # rest of it from the start of this read (the tunnel then closes, never resyncs).
        assert found == seen and expected < found


def parse(data: bytes, *, mask: bool) -> Frame:
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    parser = Frame.parse(reader.read_exact, mask=mask)
    try:
        next(parser)
    except StopIteration as done:
        frame: Frame = done.value
        return frame
    raise AssertionError("websockets wanted more bytes than the close frame has")


@given(st.sampled_from([1000, 1001, 1009, 1011, 4000]), st.text(max_size=60), st.booleans())
def test_close_frames_parse_back_with_websockets(code: int, reason: str, masked: bool) -> None:
    frame = parse(close_frame(code, reason, masked=masked), mask=masked)
    assert frame.opcode == Opcode.CLOSE and frame.fin
    close = Close.parse(frame.data)
    assert close.code == code
    assert reason.startswith(close.reason) or len(reason.encode()) > 123
