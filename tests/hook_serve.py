"""`dualproxy serve` with the hooks users commonly write, for the tests of every pairing.

    python -m tests.hook_serve serve --upstream URL --adapter wsgi --server gunicorn ...

Each hook copies client input, percent-decoded, into what goes on the wire, the
way real hooks do (a user name from a cookie, a target from a routing header):
the proxy must check what they produce, never trust it.
"""

from __future__ import annotations

import dataclasses
import sys
from urllib.parse import unquote_to_bytes

from dualproxy import cli, launch
from dualproxy.config import ProxyConfig
from dualproxy.core import ResponseHead, UpstreamPlan


def _client_header(plan: UpstreamPlan, name: bytes) -> bytes | None:
    return next((value for n, value in plan.incoming.headers if n == name), None)


def cookie_to_user(plan: UpstreamPlan) -> UpstreamPlan | None:
    """The issue's repro: the `user` cookie, percent-decoded, becomes X-User."""
    cookie = _client_header(plan, b"cookie") or b""
    for item in cookie.split(b";"):
        key, _, value = item.strip().partition(b"=")
        if key == b"user":
            return dataclasses.replace(
                plan, headers=[*plan.headers, (b"x-user", unquote_to_bytes(value))])
    return None


def target_from_header(plan: UpstreamPlan) -> UpstreamPlan | None:
    """An `X-Route-To` header, percent-decoded, becomes the upstream target."""
    route = _client_header(plan, b"x-route-to")
    return None if route is None else dataclasses.replace(plan, target=unquote_to_bytes(route))


def echo_down(plan: UpstreamPlan, head: ResponseHead) -> None:
    """An `X-Echo` request header, percent-decoded, is added to the response in place."""
    echo = _client_header(plan, b"x-echo")
    if echo is not None:
        head.headers.append((b"x-echo", unquote_to_bytes(echo)))


def header_down(plan: UpstreamPlan, head: ResponseHead) -> None:
    """An `X-Set-Header` request header, `name:value` percent-decoded, is added to the
    response (a debugging aid some deployments keep)."""
    spec = _client_header(plan, b"x-set-header")
    if spec is not None:
        name, _, value = unquote_to_bytes(spec).partition(b":")
        head.headers.append((name.strip(), value.strip()))


def _with_hooks(options: dict[str, object]) -> ProxyConfig:
    return dataclasses.replace(_config_from_options(options),
                               request_hooks=(cookie_to_user, target_from_header),
                               response_hooks=(echo_down, header_down))


_config_from_options = launch.config_from_options
launch.config_from_options = _with_hooks

if __name__ == "__main__":
    sys.exit(cli.main())
