"""The Redis store (`--cache-store redis://host:port/db`): one cache for several proxy
processes and machines (the `redis` extra: redis-py).

Per URI, a hash `dualproxy:cache:i:<key>` maps each stored variant (its secondary
key, JSON) to its status, fields and times (JSON); each body is a string key of its
own, read only when it answers. The bound in bytes is kept with a counter and an
LRU sorted set (URIs by last use); past it, the least recently used URIs go.
The client is redis-py's synchronous one on both faces (the calls are short; on
the async face they run on the loop); wrapped in `Guarded`, so a Redis that is
down makes the cache step aside.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from typing import Any

from .sqlite import entry_from_row, meta_of, variant_of
from .store import DEFAULT_MAX_OBJECT, DEFAULT_MAX_SIZE, Bounded, Entry

PREFIX = "dualproxy:cache:"


class RedisStore(Bounded):
    """Entries in Redis, shared by every proxy pointed at it."""

    name = "redis"

    def __init__(self, url: str, max_size: int = DEFAULT_MAX_SIZE,
                 max_object: int = DEFAULT_MAX_OBJECT) -> None:
        import redis

        self.url = url
        self.max_size = max_size
        self.max_object = min(max_object, max_size)
        # Short timeouts: a Redis that does not answer makes the cache step aside quickly.
        self.redis: Any = redis.Redis.from_url(url, socket_timeout=1.0,
                                               socket_connect_timeout=1.0)

    @staticmethod
    def _index(key: str) -> str:
        return f"{PREFIX}i:{key}"

    @staticmethod
    def _body_key(key: str, variant: str) -> str:
        return f"{PREFIX}b:" + hashlib.sha256(f"{key}\n{variant}".encode()).hexdigest()

    def get(self, key: str) -> list[Entry]:
        pipe = self.redis.pipeline()
        pipe.hgetall(self._index(key))
        pipe.zadd(f"{PREFIX}lru", {key: time.time()}, xx=True)
        stored, _ = pipe.execute()
        entries = []
        for variant, meta in stored.items():
            variant_text = variant.decode()
            body_key = self._body_key(key, variant_text)
            m = json.loads(meta)
            entry = entry_from_row(key, variant_text, m, m["length"],
                                   functools.partial(self._body, body_key))
            entry.ref = variant_text
            entries.append(entry)
        return entries

    def _body(self, body_key: str) -> bytes:
        return bytes(self.redis.get(body_key) or b"")

    def put(self, entry: Entry) -> None:
        size = self.fits(entry)
        if size is None:
            return
        variant = variant_of(entry)
        index = self._index(entry.key)
        old = self.redis.hget(index, variant)
        meta = meta_of(entry)
        meta["length"], meta["size"] = entry.body_length(), size
        pipe = self.redis.pipeline()
        pipe.hset(index, variant, json.dumps(meta))
        pipe.set(self._body_key(entry.key, variant), entry.content())
        pipe.incrby(f"{PREFIX}bytes", size - (json.loads(old)["size"] if old else 0))
        pipe.zadd(f"{PREFIX}lru", {entry.key: time.time()})
        pipe.execute()
        self._evict()

    def _evict(self) -> None:
        while int(self.redis.get(f"{PREFIX}bytes") or 0) > self.max_size:
            oldest = self.redis.zpopmin(f"{PREFIX}lru")
            if not oldest:
                return
            self.remove(oldest[0][0].decode())

    def update(self, entry: Entry) -> None:
        if not isinstance(entry.ref, str):
            return
        meta = meta_of(entry)
        meta["length"], meta["size"] = entry.body_length(), entry.measure()
        self.redis.hset(self._index(entry.key), entry.ref, json.dumps(meta))

    def remove(self, key: str) -> int:
        index = self._index(key)
        stored = self.redis.hgetall(index)
        size = sum(json.loads(meta)["size"] for meta in stored.values())
        pipe = self.redis.pipeline()
        pipe.delete(index, *(self._body_key(key, v.decode()) for v in stored))
        pipe.decrby(f"{PREFIX}bytes", size)
        pipe.zrem(f"{PREFIX}lru", key)
        pipe.execute()
        return len(stored)

    def discard(self, entry: Entry) -> None:
        if not isinstance(entry.ref, str):
            return
        index = self._index(entry.key)
        meta = self.redis.hget(index, entry.ref)
        if meta is None:
            return
        pipe = self.redis.pipeline()
        pipe.hdel(index, entry.ref)
        pipe.delete(self._body_key(entry.key, entry.ref))
        pipe.decrby(f"{PREFIX}bytes", json.loads(meta)["size"])
        pipe.execute()
