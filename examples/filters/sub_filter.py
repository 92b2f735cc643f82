"""Rewrite the upstream's absolute URLs in its HTML pages to the public address (nginx's
sub_filter): a match split between two network chunks is replaced too.

    DUALPROXY_UPSTREAM=http://127.0.0.1:9000 PUBLIC_URL=https://www.example.com \\
        uvicorn examples.filters.sub_filter:app --no-proxy-headers
"""

from __future__ import annotations

import os

from dualproxy import AsyncProxy
from dualproxy.filters import SubFilter

UPSTREAM = os.environ.get("DUALPROXY_UPSTREAM", "http://127.0.0.1:9000")
PUBLIC_URL = os.environ.get("PUBLIC_URL", "http://127.0.0.1:8000")

# Compressed pages are decoded first (decode=True, the default) and sent decoded.
app = AsyncProxy(UPSTREAM, filters=[
    SubFilter({UPSTREAM: PUBLIC_URL}, types=("text/html", "text/css", "application/javascript")),
])
