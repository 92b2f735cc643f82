"""Filters: what a route does to the requests and responses passing through.

`Filter` (base.py) is the unit; `Chain` (chain.py) runs a route's filters at
each stage of the exchange and owns the framing fix-up; `codings.py` decodes
content codings for body transforms. Built-in filters live beside them, one
module each; a new filter goes here too. `build_chain` decides a route's
chain from its configuration, in one documented order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Answer, Attempt, BodyTransform, Exchange, Filter
from .chain import Chain
from .transforms import (
    Buffered,
    BufferedBody,
    Mapped,
    Replace,
    RequestBodyFilter,
    ResponseBodyFilter,
    SubFilter,
    body_filter,
    request_body_filter,
)

if TYPE_CHECKING:
    from ..config import ProxyConfig

__all__ = [
    "Answer", "Attempt", "BodyTransform", "Buffered", "BufferedBody", "Chain", "Exchange", "Filter",
    "Mapped", "Replace", "RequestBodyFilter", "ResponseBodyFilter", "SubFilter", "body_filter",
    "build_chain", "request_body_filter",
]


def build_chain(config: ProxyConfig) -> Chain:
    """A route's chain, outermost (nearest the client) first:

    1. the built-in filters the configuration turns on: tracing (first, so its
       SERVER span covers every other filter's work and answers), request_id
       (next, so every other filter sees `exchange.request_id`), rate_limit (a refusal costs
       nothing else), compress, forwarded_prefix, header_rules (a rule may replace
       what the others wrote), the cache (inside compression and the header rules,
       so a hit is still compressed and each answer, a hit too, gets its own
       request's rule values, as nginx's add_header after proxy_cache), then
       `sub_filter` (last, so that a compressing filter before it encodes the
       rewritten body);
    2. the user's `filters=`, in the order given;
    3. the request and response hooks (hooks.py), in the order given.
    """
    from .compress import compress_filter
    from .hooked import hook_filters
    from .ratelimit import rate_limit
    from .transforms import sub_filter

    builtins: list[Filter] = []
    if config.tracing:
        from .tracing import Tracing

        builtins.append(Tracing.for_config(config))
    if config.request_id:
        from .request_id import RequestId

        builtins.append(RequestId(config.is_trusted if config.trusted_proxies else None))
    builtins.extend(flt for flt in (rate_limit(config), compress_filter(config)) if flt is not None)
    if config.forwarded_prefix or (config.forwarded_prefix is None and config.mount):
        from .forwarded_prefix import ForwardedPrefix

        builtins.append(ForwardedPrefix())
    if config.header_up or config.header_down:
        from .header_rules import HeaderRules

        builtins.append(HeaderRules(config.header_up, config.header_down))
    if config.cache:
        from .cache import cache_filter

        builtins.append(cache_filter(config))
    builtins.extend(flt for flt in (sub_filter(config),) if flt is not None)
    filters: list[object] = [*builtins, *config.filters,
               *hook_filters(config.request_hooks, config.response_hooks)]
    return Chain(filters)
