"""fastapi-proxy-lib's reverse_http_app forwarding every path (benchmark peer)."""

from __future__ import annotations

import os

from fastapi_proxy_lib.fastapi.app import reverse_http_app

UPSTREAM = os.environ.get("BENCH_UPSTREAM", "http://127.0.0.1:9100")
app = reverse_http_app(base_url=UPSTREAM + "/")
