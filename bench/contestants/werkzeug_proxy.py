"""werkzeug's ProxyMiddleware forwarding every path (benchmark peer).

ProxyMiddleware only matches prefixes followed by a slash (`/` becomes `//`),
so a one-line wrapper puts every request under `/p/` and the middleware
strips it again.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from werkzeug.middleware.http_proxy import ProxyMiddleware
from werkzeug.wrappers import Response

UPSTREAM = os.environ.get("BENCH_UPSTREAM", "http://127.0.0.1:9100")
_proxy = ProxyMiddleware(Response("not proxied", status=404),
                         {"/p": {"target": UPSTREAM + "/", "remove_prefix": True}})


def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    environ["PATH_INFO"] = "/p" + environ.get("PATH_INFO", "/")
    return _proxy(environ, start_response)
