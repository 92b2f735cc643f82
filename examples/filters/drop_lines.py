"""Drop the lines of a streamed log that mention a secret, as they stream: a transform
class keeps the state of one response (the line cut at the end of a chunk).

    DUALPROXY_UPSTREAM=http://127.0.0.1:9000 \\
        uvicorn examples.filters.drop_lines:app --no-proxy-headers
"""

from __future__ import annotations

import os

from dualproxy import AsyncProxy
from dualproxy.filters import ResponseBodyFilter

UPSTREAM = os.environ.get("DUALPROXY_UPSTREAM", "http://127.0.0.1:9000")


class DropSecretLines:
    """A fresh one per response: feed() gets the chunks, finish() the end."""

    def __init__(self) -> None:
        self.partial = b""  # the beginning of a line whose end has not come yet

    def feed(self, chunk: bytes) -> bytes:
        *lines, self.partial = (self.partial + chunk).split(b"\n")
        return b"".join(line + b"\n" for line in lines if b"password" not in line.lower())

    def finish(self) -> bytes:
        last, self.partial = self.partial, b""
        return b"" if b"password" in last.lower() else last


app = AsyncProxy(UPSTREAM, filters=[ResponseBodyFilter(DropSecretLines, types="text/plain")])
