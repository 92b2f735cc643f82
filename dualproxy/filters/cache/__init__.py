"""The HTTP cache: an RFC 9111 shared cache as a filter of the exchange.

`policy.py` is the RFC (pure functions), `keys.py` what identifies a stored
response, `store.py` where it lives, `filter.py` the filter that uses them.
`cache_filter(config)` builds the route's cache from its configuration.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...config import check_store
from .filter import Cache
from .refresh import Refresher
from .store import (
    DEFAULT_MAX_OBJECT,
    DEFAULT_MAX_SIZE,
    Entry,
    Guarded,
    MemoryStore,
    Store,
)

if TYPE_CHECKING:
    from ...config import ProxyConfig

__all__ = ["DEFAULT_MAX_OBJECT", "DEFAULT_MAX_SIZE", "Cache", "Entry", "MemoryStore",
           "Store", "cache_filter", "make_store"]


def make_store(spec: str, max_size: int = DEFAULT_MAX_SIZE,
               max_object: int = DEFAULT_MAX_OBJECT) -> Store:
    """The store `spec` names: `memory`, `sqlite:PATH` or `redis://...` (ValueError
    otherwise)."""
    check_store(spec)
    if spec == "memory":
        return MemoryStore(max_size, max_object)
    if spec.startswith("sqlite:"):
        from .sqlite import SqliteStore

        return Guarded(SqliteStore(spec[len("sqlite:"):], max_size, max_object))
    from .redis import AsyncRedisStore

    # The asyncio driver; the sync face takes its sync twin (Cache.for_sync_face).
    return Guarded(AsyncRedisStore(spec, max_size, max_object))


def cache_filter(config: ProxyConfig) -> Cache:
    """The route's cache filter, its store as the configuration names it."""
    store = make_store(config.cache_store, config.cache_max_size, config.cache_max_object)
    return Cache(store, store_set_cookie=config.cache_set_cookie,
                 may_purge=config.may_purge,
                 refresher=Refresher(config, store.max_object))
