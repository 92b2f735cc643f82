"""fastapi-proxy-lib's reverse_ws_app forwarding every path (WebSocket benchmark peer).

Its default message limit (httpx-ws: 64 KiB) would refuse the 1 MiB messages; it gets
dualproxy's default, 16 MiB.
"""

from __future__ import annotations

import os

from fastapi_proxy_lib.fastapi.app import reverse_ws_app

UPSTREAM = os.environ.get("BENCH_WS_UPSTREAM", "ws://127.0.0.1:9100")
app = reverse_ws_app(base_url=UPSTREAM + "/", max_message_size_bytes=16 * 1024 * 1024)
