"""Flask glue: the proxy as an extension, a blueprint, or WSGI middleware.

- `FlaskProxy(app, upstream=..., prefix="/upload")` (or `init_app`) and
  `proxy_blueprint(...)` route the prefix through Flask, so the app's
  `before_request` hooks (auth), error handlers and sessions apply first.
- `wrap_wsgi_app(app, upstream, mount)` sits in front of Flask entirely: the
  fastest form, for prefixes that need nothing from the app.

Every form streams: the view hands the raw WSGI environ to `SyncProxy` and
returns its iterable untouched (`direct_passthrough`), never `get_data()`.
Every form proxies WebSockets under its prefix too (gunicorn's gthread worker
or werkzeug's server; see `dualproxy.websocket.tunnel`); with the first two,
a `before_request` hook that answers refuses the handshake.
"""

from __future__ import annotations

import atexit
from collections.abc import Iterable
from typing import Any, cast

from flask import Blueprint, Flask, Response, abort, request
from flask.blueprints import BlueprintSetupState
from werkzeug.routing import PathConverter

from .core import PROXY_METHODS
from .types import ExcInfo, WSGIApp
from .websocket.tunnel import Tunnel
from .wsgi import SyncProxy, incoming_from_environ


class _PassthroughResponse(Response):
    # Werkzeug would add `Content-Type: text/html` to an upstream answer that has none.
    default_mimetype = None


class _AnyPath(PathConverter):
    """Werkzeug's `path` converter, but also matching a rest that starts with `/`.

    `/upload//x` is forwarded as `//x` below the upstream base, as the other
    forms do, instead of Flask answering 404 or redirecting to `/upload/x`.
    """

    regex = ".*?"
    part_isolating = False  # werkzeug would infer True from a regex without "/"


class _TunnelResponse(Response):
    """An accepted WebSocket handshake: the tunnel runs when the server iterates it,
    after Flask's dispatch (a hook's exception handling never sees it end)."""

    def __init__(self, tunnel: Tunnel) -> None:
        super().__init__(status=101)
        self.tunnel = tunnel

    def __call__(self, environ: Any, start_response: Any) -> Iterable[bytes]:
        return self.tunnel


_CONVERTER = "dualproxy_path"
_PATH_ARG = "dualproxy_path"


def _register_converter(state: BlueprintSetupState) -> None:
    state.app.url_map.converters.setdefault(_CONVERTER, _AnyPath)


def _mount(prefix: str) -> str:
    prefix = "/" + prefix.strip("/")
    return "" if prefix == "/" else prefix


def _proxy_view(proxy: SyncProxy, rest: str | None) -> Response:
    """Run the proxy on the current request's environ and stream its answer back."""
    environ = dict(request.environ)
    # The prefix is what the rule matched before the forwarded rest: this holds
    # whatever url_prefix the blueprint was registered with (or nested under).
    path = request.path
    prefix = (path[:len(path) - len(rest)] if rest else path).rstrip("/")
    # The core strips SCRIPT_NAME from the raw target: make it end at the prefix.
    environ["SCRIPT_NAME"] = environ.get("SCRIPT_NAME", "").rstrip("/") + prefix
    if environ["SCRIPT_NAME"] and not incoming_from_environ(environ).mount:
        # Werkzeug matched a normalised path (`//upload/x`) that the raw target
        # is not under: outside the mount, as for the other forms.
        abort(404)
    captured: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]],
                       exc_info: ExcInfo | None = None) -> Any:
        captured["status"] = status
        captured["headers"] = headers
        return lambda data: None

    body: Iterable[bytes] = proxy(environ, start_response)
    if isinstance(body, Tunnel):
        return _TunnelResponse(body)
    response = _PassthroughResponse(body, status=captured["status"],
                                    headers=captured["headers"], direct_passthrough=True)
    close = getattr(body, "close", None)
    if close is not None:
        response.call_on_close(close)
    return response


def proxy_blueprint(name: str, upstream: str | None, url_prefix: str, *,
                    proxy: SyncProxy | None = None, **options: Any) -> Blueprint:
    """A blueprint that forwards everything under `url_prefix` to `upstream`.

    `app.register_blueprint(proxy_blueprint("storage", "http://storage:9000", "/upload"))`.
    What follows the matched prefix is forwarded, whatever `url_prefix` the
    blueprint is finally registered (or nested) under. Pass `proxy=` (and `None`
    as the upstream) to share a SyncProxy.
    """
    prefix = _mount(url_prefix)
    if proxy is None:
        if upstream is None:
            raise TypeError("proxy_blueprint needs an upstream URL or proxy=")
        proxy = SyncProxy(upstream, **options)
        atexit.register(proxy.close)
    bound = proxy
    blueprint = Blueprint(name, __name__, url_prefix=prefix or None)
    blueprint.record_once(_register_converter)

    def forward(**view_args: str) -> Response:
        return _proxy_view(bound, view_args.get(_PATH_ARG))

    # Werkzeug routes a WebSocket handshake only to rules marked `websocket`.
    for websocket, methods in ((False, list(PROXY_METHODS)), (True, ["GET"])):
        blueprint.add_url_rule("/", "forward_root", forward, methods=methods,
                               strict_slashes=False, merge_slashes=False, websocket=websocket)
        blueprint.add_url_rule(f"/<{_CONVERTER}:{_PATH_ARG}>", "forward", forward,
                               methods=methods, merge_slashes=False, websocket=websocket)
    return blueprint


class FlaskProxy:
    """Flask extension: `FlaskProxy(app, upstream="http://storage:9000", prefix="/upload")`.

    The factory style works too: `ext = FlaskProxy(upstream=..., prefix=...)`, then
    `ext.init_app(app)`. One client per process, closed at exit. `name` is the
    blueprint's (and `app.extensions` key); by default it comes from the prefix
    (`dualproxy_upload` for `/upload`), so several proxies fit in one app.
    """

    def __init__(self, app: Flask | None = None, *, upstream: str, prefix: str,
                 name: str | None = None, **options: Any) -> None:
        self.prefix = _mount(prefix)
        self.name = name if name is not None else _blueprint_name(self.prefix)
        self.proxy = SyncProxy(upstream, **options)
        atexit.register(self.proxy.close)
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        blueprint = proxy_blueprint(self.name, None, self.prefix, proxy=self.proxy)
        app.register_blueprint(blueprint)
        app.extensions[self.name] = self


def _blueprint_name(prefix: str) -> str:
    """`dualproxy` for the root, `dualproxy_files_v1` for `/files/v1` (a blueprint
    name holds no dot); other characters are spelled by their code point, so two
    prefixes never share a name."""
    return "dualproxy" + "".join(
        ch if ch.isascii() and ch.isalnum() else "_" if ch == "/" else f"_{ord(ch):x}_"
        for ch in prefix)


def wrap_wsgi_app(app: Flask, upstream: str, mount: str, **options: Any) -> SyncProxy:
    """Put the proxy in front of `app.wsgi_app`: `mount` is proxied, the rest reaches Flask."""
    proxy = SyncProxy(upstream, mount=mount, fallback=cast(WSGIApp, app.wsgi_app), **options)
    atexit.register(proxy.close)
    app.wsgi_app = proxy  # type: ignore[method-assign,assignment]
    return proxy
