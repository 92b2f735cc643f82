"""`X-Forwarded-Prefix`: the mount the proxy stripped, for the upstream's links.

An app behind `--mount /api` sees `/x` for the client's `/api/x`; told the
prefix, it builds its links under the mount (Starlette's `root_path`, Flask's
`SCRIPT_NAME` through werkzeug's ProxyFix `x_prefix`, Spring's
ForwardedHeaderFilter). Sent with the other forwarding headers and under the
same trust rules (headers.py): a trusted peer's own `X-Forwarded-Prefix` (its
mount, in front of ours) is kept and ours appended to it (`/outer` + `/api` =
`/outer/api`), an untrusted peer's never reaches here (the core drops it).
Nothing is added where no prefix is stripped. One line, always: the trusted
peer's first line is the one kept.

On by default when the route names a mount (`--no-forwarded-prefix`,
`forwarded_prefix = false` turn it off); `forwarded_prefix=True` in the Python
API also sends the mount a host app routed on (FastAPI's `app.mount`).
"""

from __future__ import annotations

from ..wire import TARGET
from .base import Exchange, Filter

HEADER = b"x-forwarded-prefix"


def prefix(inbound: bytes | None, mount: bytes) -> bytes:
    """The prefix to send: a trusted peer's (when it is a path) then the mount."""
    if inbound is not None:
        inbound = inbound.strip().rstrip(b"/")
        if inbound.startswith(b"/") and TARGET.match(inbound):
            return inbound + mount
    return mount


class ForwardedPrefix(Filter):
    """Send the mount the request was routed on as `X-Forwarded-Prefix`."""

    name = "forwarded_prefix"

    def on_request(self, exchange: Exchange) -> None:
        plan = exchange.plan
        assert plan is not None
        mount = plan.mount
        if not mount:
            return  # nothing stripped: a trusted peer's line passes as it came
        inbound = next((v for n, v in plan.headers if n == HEADER), None)
        headers = [(n, v) for n, v in plan.headers if n != HEADER]
        headers.append((HEADER, prefix(inbound, mount)))
        plan.headers[:] = headers
