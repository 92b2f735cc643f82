"""The `header_rules` filter: a route's header rules, both directions.

nginx's `proxy_set_header`/`proxy_hide_header`/`add_header`, Caddy's
`header_up`/`header_down`. `header_up` rules change the request sent upstream
(after the forwarding headers are written: a rule may replace them),
`header_down` rules the response sent to the client. The grammar, the checks
and the application are rules.py's; this module gives the variables their
values per exchange:

- `{client}`: the client's address after trusted proxies;
- `{request_id}`: the exchange's request id (request ids on: checked at start);
- `{host}`: the Host the client asked for, port included (nginx's `$http_host`);
- `{scheme}`: `http` or `https`, as the client came.
"""

from __future__ import annotations

from ..core import ResponseHead
from ..rules import HeaderRule, apply
from ..target import target_authority
from .base import Exchange, Filter


def variable_values(exchange: Exchange) -> dict[str, bytes]:
    """The variables' values for one exchange (bytes as they would be sent)."""
    incoming = exchange.incoming
    # The Host the client asked for, as nginx's $http_host (RFC 9112 3.2.2: an
    # absolute-form target's authority first).
    host = target_authority(incoming.target) or next(
        (v for n, v in incoming.headers if n == b"host"), b"")
    client = exchange.client or ""
    return {
        "client": client.encode("latin-1", "replace"),
        "request_id": (exchange.request_id or "").encode("latin-1", "replace"),
        "host": host,
        "scheme": incoming.scheme.encode("latin-1", "replace"),
    }


class HeaderRules(Filter):
    """The route's `header_up` and `header_down` rules (module docstring)."""

    name = "header_rules"

    def __init__(self, up: tuple[HeaderRule, ...], down: tuple[HeaderRule, ...]) -> None:
        self.up = up
        self.down = down
        self._up_vars = any(rule.static is None for rule in up if rule.op != "remove")
        self._down_vars = any(rule.static is None for rule in down if rule.op != "remove")

    def on_request(self, exchange: Exchange) -> None:
        plan = exchange.plan
        assert plan is not None
        values = variable_values(exchange) if self._up_vars else None
        plan.headers[:] = apply(plan.headers, self.up, values)

    def on_response(self, exchange: Exchange, head: ResponseHead) -> None:
        values = variable_values(exchange) if self._down_vars else None
        head.headers[:] = apply(head.headers, self.down, values)
