"""Rewrite request bodies on their way up: CRLF line ends become LF in uploaded text,
with `Replace`, the streaming replacement SubFilter uses (a CRLF cut between two chunks
is still one line end). The upstream then gets the body chunked.

    DUALPROXY_UPSTREAM=http://127.0.0.1:9000 \\
        gunicorn -k gthread --threads 32 examples.filters.request_body:app
"""

from __future__ import annotations

import os

from dualproxy import SyncProxy
from dualproxy.filters import Replace, RequestBodyFilter

UPSTREAM = os.environ.get("DUALPROXY_UPSTREAM", "http://127.0.0.1:9000")

app = SyncProxy(UPSTREAM, filters=[
    RequestBodyFilter(lambda: Replace({b"\r\n": b"\n"}), types=("text/plain", "text/csv")),
])
