"""A function on every chunk of decoded bodies: gzip, deflate, br or zstd text is decoded
first, the function sees plain text, and the client gets it without Content-Encoding.

    DUALPROXY_UPSTREAM=http://127.0.0.1:9000 \\
        uvicorn examples.filters.tabs_to_spaces:app --no-proxy-headers
"""

from __future__ import annotations

import os

from dualproxy import AsyncProxy
from dualproxy.filters import body_filter

UPSTREAM = os.environ.get("DUALPROXY_UPSTREAM", "http://127.0.0.1:9000")


def tabs_to_spaces(chunk: bytes) -> bytes:
    # One byte for four: a chunk boundary can never cut a tab in two. (Text longer
    # than a byte can be cut between chunks: use SubFilter, Buffered or a class.)
    return chunk.replace(b"\t", b"    ")


app = AsyncProxy(UPSTREAM, filters=[body_filter(tabs_to_spaces, types="text/plain", decode=True)])
