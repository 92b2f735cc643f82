"""Filters: what a route does to the requests and responses passing through.

`Filter` (base.py) is the unit; `Chain` (chain.py) runs a route's filters at
each stage of the exchange and owns the framing fix-up; `codings.py` decodes
content codings for body transforms. Built-in filters live beside them, one
module each; a new filter goes here too. `build_chain` decides a route's
chain from its configuration, in one documented order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Answer, BodyTransform, Exchange, Filter
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
    "Answer", "BodyTransform", "Buffered", "BufferedBody", "Chain", "Exchange", "Filter",
    "Mapped", "Replace", "RequestBodyFilter", "ResponseBodyFilter", "SubFilter", "body_filter",
    "build_chain", "request_body_filter",
]


def build_chain(config: ProxyConfig) -> Chain:
    """A route's chain, outermost (nearest the client) first:

    1. the built-in filters the configuration turns on, in this order: ...,
       the cache (`cache`: after compression, so a hit is still compressed; before
       `sub_filter`, so the rewritten body is what is stored), `sub_filter` last (a
       compressing filter before it encodes the rewritten body);
    2. the user's `filters=`, in the order given;
    3. the request and response hooks (hooks.py), in the order given.
    """
    from ..hooks import hook_filters
    from .transforms import sub_filter

    builtin: list[Filter] = []
    if config.cache:
        from .cache import cache_filter

        builtin.append(cache_filter(config))
    builtin += [flt for flt in (sub_filter(config),) if flt is not None]
    filters = [*builtin, *config.filters,
               *hook_filters(config.request_hooks, config.response_hooks)]
    return Chain(filters)
