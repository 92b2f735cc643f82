"""The HTTP cache: an RFC 9111 shared cache as a filter of the exchange.

`policy.py` is the RFC (pure functions), `keys.py` what identifies a stored
response, `store.py` where it lives, `filter.py` the filter that uses them.
`cache_filter(config)` builds the route's cache from its configuration.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .filter import Cache
from .refresh import Refresher
from .store import DEFAULT_MAX_OBJECT, DEFAULT_MAX_SIZE, Entry, MemoryStore

if TYPE_CHECKING:
    from ...config import ProxyConfig

__all__ = ["DEFAULT_MAX_OBJECT", "DEFAULT_MAX_SIZE", "Cache", "Entry", "MemoryStore",
           "cache_filter"]


def cache_filter(config: ProxyConfig) -> Cache:
    """The route's cache filter, its store as the configuration names it."""
    store = MemoryStore(config.cache_max_size, config.cache_max_object)
    return Cache(store, store_set_cookie=config.cache_set_cookie,
                 may_purge=config.may_purge,
                 refresher=Refresher(config, store.max_object))
