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

if TYPE_CHECKING:
    from ..config import ProxyConfig

__all__ = ["Answer", "BodyTransform", "Chain", "Exchange", "Filter", "build_chain"]


def build_chain(config: ProxyConfig) -> Chain:
    """A route's chain, outermost (nearest the client) first:

    1. the built-in filters the configuration turns on, in this order: ...,
       the cache (`cache`: after compression, so a hit is still compressed);
    2. the user's `filters=`, in the order given;
    3. the request and response hooks (hooks.py), in the order given.
    """
    from ..hooks import hook_filters

    builtin: list[Filter] = []
    if config.cache:
        from .cache import cache_filter

        builtin.append(cache_filter(config))
    filters = [*builtin, *config.filters,
               *hook_filters(config.request_hooks, config.response_hooks)]
    return Chain(filters)
