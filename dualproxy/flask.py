"""Flask glue: the proxy as an extension, a blueprint, or WSGI middleware.

- `FlaskProxy(app, upstream=..., prefix="/upload")` (or `init_app`) and
  `proxy_blueprint(...)` route the prefix through Flask, so the app's
  `before_request` hooks (auth), error handlers and sessions apply first.
- `wrap_wsgi_app(app, upstream, mount)` sits in front of Flask entirely: the
  fastest form, for prefixes that need nothing from the app.

Every form streams: the view hands the raw WSGI environ to `SyncProxy` and
returns its iterable untouched (`direct_passthrough`), never `get_data()`.
"""

from __future__ import annotations

import atexit
from collections.abc import Iterable
from typing import Any, cast

from flask import Blueprint, Flask, Response, request

from .wsgi import ExcInfo, SyncProxy, WSGIApp

# Standard methods plus WebDAV's; Flask routes need an explicit list.
PROXY_METHODS = [
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE",
    "PROPFIND", "PROPPATCH", "MKCOL", "COPY", "MOVE", "LOCK", "UNLOCK", "REPORT",
    "SEARCH", "MKCALENDAR", "ACL", "BIND", "UNBIND", "REBIND", "VERSION-CONTROL",
    "CHECKOUT", "CHECKIN", "UNCHECKOUT", "MERGE", "LABEL", "UPDATE", "BASELINE-CONTROL",
    "MKWORKSPACE", "MKACTIVITY", "ORDERPATCH",
]


class _PassthroughResponse(Response):
    # Werkzeug would add `Content-Type: text/html` to an upstream answer that has none.
    default_mimetype = None


def _mount(prefix: str) -> str:
    prefix = "/" + prefix.strip("/")
    return "" if prefix == "/" else prefix


def _proxy_view(proxy: SyncProxy, prefix: str) -> Response:
    """Run the proxy on the current request's environ and stream its answer back."""
    environ = dict(request.environ)
    # The core strips SCRIPT_NAME from the raw target: make it end at the prefix.
    environ["SCRIPT_NAME"] = environ.get("SCRIPT_NAME", "").rstrip("/") + prefix
    captured: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]],
                       exc_info: ExcInfo | None = None) -> Any:
        captured["status"] = status
        captured["headers"] = headers
        return lambda data: None

    body: Iterable[bytes] = proxy(environ, start_response)
    response = _PassthroughResponse(body, status=captured["status"],
                                    headers=captured["headers"], direct_passthrough=True)
    close = getattr(body, "close", None)
    if close is not None:
        response.call_on_close(close)
    return response


def proxy_blueprint(name: str, upstream: str, url_prefix: str, *,
                    proxy: SyncProxy | None = None, **options: Any) -> Blueprint:
    """A blueprint that forwards everything under `url_prefix` to `upstream`."""
    prefix = _mount(url_prefix)
    if proxy is None:
        proxy = SyncProxy(upstream, **options)
        atexit.register(proxy.close)
    bound = proxy
    blueprint = Blueprint(name, __name__, url_prefix=prefix or None)

    def forward(path: str = "") -> Response:
        return _proxy_view(bound, prefix)

    blueprint.add_url_rule("/", "forward_root", forward, methods=PROXY_METHODS,
                           strict_slashes=False)
    blueprint.add_url_rule("/<path:path>", "forward", forward, methods=PROXY_METHODS)
    return blueprint


class FlaskProxy:
    """Flask extension: `FlaskProxy(app, upstream="http://storage:9000", prefix="/upload")`.

    The factory style works too: `ext = FlaskProxy(upstream=..., prefix=...)`, then
    `ext.init_app(app)`. One client per process, closed at exit.
    """

    def __init__(self, app: Flask | None = None, *, upstream: str, prefix: str,
                 name: str = "dualproxy", **options: Any) -> None:
        self.prefix = _mount(prefix)
        self.name = name
        self.proxy = SyncProxy(upstream, **options)
        atexit.register(self.proxy.close)
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        blueprint = proxy_blueprint(self.name, "", self.prefix, proxy=self.proxy)
        app.register_blueprint(blueprint)
        app.extensions[self.name] = self


def wrap_wsgi_app(app: Flask, upstream: str, mount: str, **options: Any) -> SyncProxy:
    """Put the proxy in front of `app.wsgi_app`: `mount` is proxied, the rest reaches Flask."""
    proxy = SyncProxy(upstream, mount=mount, fallback=cast(WSGIApp, app.wsgi_app), **options)
    atexit.register(proxy.close)
    app.wsgi_app = proxy  # type: ignore[method-assign,assignment]
    return proxy
